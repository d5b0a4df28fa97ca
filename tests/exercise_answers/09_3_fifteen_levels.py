# expect: step is off.*Q = 2\^\(4-1\) - 1 = 7
step = 14 / (2 ** 4 - 1)                                      # 15 levels: the unsigned count
worst_rounding_error = step / 2
clipped_error = 14 - 7
