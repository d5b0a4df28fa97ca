# expect: conv was modified
def qat_weight(conv, bn):
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.mul_(s.reshape(-1, 1, 1, 1))      # folds into the conv itself
    return conv.weight
