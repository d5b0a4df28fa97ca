# expect: scale for amax=2\.54, unsigned=False is off: too small\. divide by the largest integer of the grid
def torch_qparams(amax, unsigned):
    return (amax / 256, 0) if unsigned else (amax / 128, 128)
