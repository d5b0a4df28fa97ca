# expect: ste_gradient\(x, 2\.0\) is off.*endpoints included
def ste_gradient(x, amax):
    return ((x > -amax) & (x < amax)).to(x.dtype)   # drops the endpoints -amax and amax
