# expect: qat_weight\(conv, bn\) is off
def qat_weight(conv, bn):
    s = bn.weight / (bn.running_var + bn.eps)     # divides by the variance, not the standard deviation
    return conv.weight * s.reshape(-1, 1, 1, 1)
