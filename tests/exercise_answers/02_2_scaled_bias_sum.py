# expect: the folded conv: bias is off by .*\(weight matches\).*Sum the original W \(not the scaled W'\) against c
def fold_bn_into_next_conv(bn, conv):
    a = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    c = bn.bias.detach() - bn.running_mean * a
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * a[None, :, None, None])
        folded.bias.copy_(conv.bias + (folded.weight * c[None, :, None, None]).sum(dim=(1, 2, 3)))
    return folded
