# expect: deployed_bias\(conv, bn\) is off.*conv's own bias
def deployed_bias(conv, bn):
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return bn.bias - bn.running_mean * s                          # the formula for a conv without bias
