# expect: deployed_bias\(conv, bn\) is off.*running mean
def deployed_bias(conv, bn):
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return bn.bias + conv.bias * s                                # forgets to subtract mu_run
