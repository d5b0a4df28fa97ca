# expect: w_deployed is off.*merged weight before folding
w_deployed = 2 + (2 / 1) * 3 * 0.5
b_deployed = 1.0
