# expect: the fraction of kept elements is off.*probability 1 - p
def dropout_by_hand(x, p, generator):
    keep = (torch.rand(x.shape, generator=generator) < p).to(x.dtype)   # keeps with probability p, drops 1 - p
    return x * keep / (1 - p)
