# expect: too large where s > 1 and too small where s < 1
def clip_thresholds(s):
    return 6 * s                      # multiplied, as if the first layer's outputs were scaled up by s
