# expect: ex1_out is 18 \(\+2\), expected 16\. Dilation 2 makes the 5-tap kernel cover
ex1_out = (37 + 2 * 1 - (5 - 1) - 1) // 2 + 1
ex1_params = 96 * (48 // 3) * 5 * 5 + 96
ex1_macs = ex1_out * ex1_out * 96 * (48 // 3) * 5 * 5
