# expect: corner_error is off
corner_error = 4.5          # the whole folded bias, as if the original added nothing
edge_error = 4.5
