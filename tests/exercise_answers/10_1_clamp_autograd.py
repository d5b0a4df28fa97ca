# expect: ste_gradient\(x, 2\.0\) is off.*ends of the range.*torch\.clamp
def ste_gradient(x, amax, unsigned=False):
    x = x.detach().clone().requires_grad_(True)
    torch.clamp(x, 0.0 if unsigned else -amax, amax).sum().backward()   # clamp's gradient is 0 at exactly +-amax
    return x.grad
