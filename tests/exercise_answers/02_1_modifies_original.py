# expect: the original conv was modified \(weight, bias changed\)\. Work on a copy
def fold_conv1d_bn1d(conv, bn):
    k = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        conv.weight.mul_(k[:, None, None])
        conv.bias.copy_((conv.bias - bn.running_mean) * k + bn.bias)
    return conv
