# expect: different masks: draw the mask with torch.rand\(x.shape, generator=generator\)
def dropout_by_hand(x, p, generator):
    keep = (torch.rand(x.shape) >= p).to(x.dtype)                       # ignores the generator: not reproducible
    return x * keep / (1 - p)
