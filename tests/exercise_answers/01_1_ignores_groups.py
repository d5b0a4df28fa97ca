# expect: ex1_params is 115296: that is too large\. With groups=3 each filter
ex1_out = (37 + 2 * 1 - 2 * (5 - 1) - 1) // 2 + 1
ex1_params = 96 * 48 * 5 * 5 + 96
ex1_macs = ex1_out * ex1_out * 96 * 48 * 5 * 5
