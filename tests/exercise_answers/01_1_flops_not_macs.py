# expect: ex1_macs is 19660800: that is too large\. That is FLOPs: one MAC is
ex1_out = (37 + 2 * 1 - 2 * (5 - 1) - 1) // 2 + 1
ex1_params = 96 * (48 // 3) * 5 * 5 + 96
ex1_macs = 2 * ex1_out * ex1_out * 96 * (48 // 3) * 5 * 5
