# expect: deployed_bias\(conv, bn\) is off.*standard deviation
def deployed_bias(conv, bn):
    s = bn.weight / (bn.running_var + bn.eps)                     # divides by the variance, not the standard deviation
    return bn.bias + (conv.bias - bn.running_mean) * s
