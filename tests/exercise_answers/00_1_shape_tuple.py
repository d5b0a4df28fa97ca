# expect: n_test is of type Size, expected int
n_test = x_test.shape
