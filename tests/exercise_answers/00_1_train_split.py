# expect: n_test is 1437: that is too large\. That is the train split:
n_test = len(x_train)
