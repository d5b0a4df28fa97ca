# expect: the folded conv: weight is off by .*bias is off by .*Did you forget eps\? k = γ/√\(σ² \+ ε\), and this BatchNorm has eps = 0\.1
def fold_conv1d_bn1d(conv, bn):
    k = bn.weight.detach() / torch.sqrt(bn.running_var)            # eps forgotten
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * k[:, None, None])
        folded.bias.copy_((conv.bias - bn.running_mean) * k + bn.bias)
    return folded
