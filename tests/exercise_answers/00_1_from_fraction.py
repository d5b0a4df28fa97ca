# expect: n_test is 359 \(-1\), expected 360\. The split is stratified
n_test = int(0.2 * 1797)
