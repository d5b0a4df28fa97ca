# expect: scale for amax=2\.54, unsigned=False is off: too large\. that is quant_scale
def torch_qparams(amax, unsigned):
    return (255 / amax, 0) if unsigned else (127 / amax, 128)   # quant_scale, the reciprocal
