# expect: clipped_error is too large: with a = 7 the value 14 is clamped to a
step = 14 / 7
worst_rounding_error = step / 2
clipped_error = 14                                            # the whole value, not what clamping to a = 7 loses
