# expect: conv was modified
def deployed_bias(conv, bn):
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.bias.sub_(bn.running_mean).mul_(s).add_(bn.bias)         # folds into the conv's own bias
    return conv.bias
