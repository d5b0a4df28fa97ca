# expect: w_deployed is off
k = 2 / 15 ** 0.5
w_deployed = (2 + (2 / 1) * 3 * 0.5) * k
b_deployed = (0 - 1) * k + 1
