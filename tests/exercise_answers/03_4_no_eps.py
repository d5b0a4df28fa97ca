# expect: the folded conv: weight is off .*bias is off .*That is the fold without eps
def conv_bn_relu6_fuser(is_qat, conv, bn, relu6):
    fused = copy.deepcopy(conv)
    k = bn.weight / torch.sqrt(bn.running_var)
    with torch.no_grad():
        fused.weight.mul_(k.reshape(-1, 1, 1, 1))
    fused.bias = nn.Parameter((-bn.running_mean * k + bn.bias).detach())
    return nn.Sequential(fused, copy.deepcopy(relu6))
