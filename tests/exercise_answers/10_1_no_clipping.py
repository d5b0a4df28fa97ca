# expect: ste_gradient\(x, 2\.0\) is off.*blocks it \(0\) where x is clipped
def ste_gradient(x, amax):
    return torch.ones_like(x)                     # the identity everywhere: forgets that clipped values are constant
