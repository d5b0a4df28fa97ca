# expect: x_hat_minus_3 is .*clipped to qmin = -7
step = 2.0 / 7
q_0_9 = round(0.9 / step)
x_hat_minus_3 = round(-3 / step) * step   # rounded, but never clamped to the grid
