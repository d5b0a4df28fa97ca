# expect: the folded conv: bias is off by .*\(weight matches\).*The conv has a bias: b' = \(b − μ\)·k \+ β
def fold_conv1d_bn1d(conv, bn):
    k = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * k[:, None, None])
        folded.bias.copy_(-bn.running_mean * k + bn.bias)
    return folded
