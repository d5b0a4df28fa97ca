# expect: should return a tensor
def clip_thresholds(s):
    return [6 / float(v) for v in s]
