# expect: n_test is 1437 \(\+1077\), expected 360\. That is the train split
n_test = len(x_train)
