# expect: ste_gradient\(x, 2\.0\) has dtype torch\.int64: return a float tensor
def ste_gradient(x, amax, unsigned=False):
    lower = 0.0 if unsigned else -amax
    return ((x >= lower) & (x <= amax)).long()                    # an integer tensor, not a float one
