# expect: zero_point for amax=2\.54, unsigned=False is 0.*shifted into 0\.\.255
def torch_qparams(amax, unsigned):
    return (amax / 255, 0) if unsigned else (amax / 127, 0)
