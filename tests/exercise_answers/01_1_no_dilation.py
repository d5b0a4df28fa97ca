# expect: ex1_out is 18: that is too large\. Dilation 2 makes the 5\-ta
ex1_out = (37 + 2 * 1 - (5 - 1) - 1) // 2 + 1
ex1_params = 96 * (48 // 3) * 5 * 5 + 96
ex1_macs = ex1_out * ex1_out * 96 * (48 // 3) * 5 * 5
