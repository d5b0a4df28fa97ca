# expect: ste_gradient\(x, 2\.0\) for a float64 x has dtype torch\.float32
def ste_gradient(x, amax, unsigned=False):
    lower = 0.0 if unsigned else -amax
    return ((x >= lower) & (x <= amax)).float()                   # float32 whatever x's dtype
