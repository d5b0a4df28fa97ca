# expect: step is 0\.25.*qmax for b signed bits is 2\^\(b-1\) - 1
step = 2.0 / 8                     # 2^(b-1) levels per side, forgetting the -1
q_0_9 = round(0.9 / step)
x_hat_minus_3 = -8 * step
