# expect: worst_rounding_error is too large: .*half a step
step = 14 / 7
worst_rounding_error = step                                   # a whole step
clipped_error = 14 - 7
