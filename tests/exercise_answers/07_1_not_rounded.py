# expect: q_0_9 is 3\.15.*integer on the grid
step = 2.0 / 7
q_0_9 = 0.9 / step                 # not rounded
x_hat_minus_3 = -7 * step
