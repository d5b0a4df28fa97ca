# expect: qat_weight\(conv, bn\) is off.*with eps, under the root
def qat_weight(conv, bn):
    s = bn.weight / torch.sqrt(bn.running_var)    # no eps
    return conv.weight * s.reshape(-1, 1, 1, 1)
