# expect: the conv given to your fuser was modified \(weight changed\)
def conv_bn_relu6_fuser(is_qat, conv, bn, relu6):
    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        conv.weight.mul_(k.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter((-bn.running_mean * k + bn.bias).detach())
    return nn.Sequential(conv, relu6)
