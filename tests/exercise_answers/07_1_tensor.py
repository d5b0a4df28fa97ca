# expect: step should be a plain Python number, not a tensor
step = quant.step_size(2.0, 4)     # a 0-d tensor
q_0_9 = 3
x_hat_minus_3 = -2.0
