# expect: n_test is 359: that is too small\. The split is stratified a
n_test = int(0.2 * 1797)
