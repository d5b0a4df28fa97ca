# expect: deployed_bias\(conv, bn\) is off.*with eps, under the root
def deployed_bias(conv, bn):
    s = bn.weight / torch.sqrt(bn.running_var)                    # no eps
    return bn.bias + (conv.bias - bn.running_mean) * s
