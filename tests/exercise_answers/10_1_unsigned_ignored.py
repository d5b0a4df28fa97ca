# expect: ste_gradient\(x, 2\.0, unsigned=True\) is off.*negative x is clipped
def ste_gradient(x, amax, unsigned=False):
    return ((x >= -amax) & (x <= amax)).to(x.dtype)               # the signed range, whatever unsigned says
