# expect: ste_gradient\(x, 2\.0\) is a bool tensor
def ste_gradient(x, amax, unsigned=False):
    return (x >= (0.0 if unsigned else -amax)) & (x <= amax)      # the mask itself, not a float gradient
