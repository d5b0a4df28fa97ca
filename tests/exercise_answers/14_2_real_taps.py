# expect: corner_error is off.*taps of a corner pixel's 3x3 window that fall outside
corner_error = 4 * 0.5      # counted the taps inside the image instead of those on the padding
edge_error = 6 * 0.5
