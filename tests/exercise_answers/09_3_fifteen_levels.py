# expect: step is too small: a signed narrow-range grid of b bits has Q = 2\^\(b-1\) - 1 levels
step = 14 / (2 ** 4 - 1)                                      # 15 levels: the unsigned count
worst_rounding_error = step / 2
clipped_error = 14 - 7
