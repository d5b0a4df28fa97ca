# expect: the kept values is off.*scales the kept values by 1 / \(1 - p\)
def dropout_by_hand(x, p, generator):
    keep = (torch.rand(x.shape, generator=generator) >= p).to(x.dtype)
    return x * keep                                                      # no 1 / (1 - p): E[output] = (1 - p) x
