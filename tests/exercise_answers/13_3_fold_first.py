# expect: w_deployed is off.*You folded BatchNorm before merging
delta_w = (2 / 1) * 3 * 0.5
k = 2 / (15 + 1) ** 0.5
w_deployed = 2 * k + delta_w
b_deployed = (0 - 1) * k + 1
