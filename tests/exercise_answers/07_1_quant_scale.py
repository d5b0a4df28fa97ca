# expect: step is 3\.5: it is too large\. That is quant_scale
step = 7 / 2.0                     # qmax / amax: the reciprocal
q_0_9 = round(0.9 / (2.0 / 7))
x_hat_minus_3 = -2.0
