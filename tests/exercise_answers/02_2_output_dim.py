# expect: your code raised RuntimeError: .*Hint: A shape error often means the scale is laid out on the wrong weight dim
def fold_bn_into_next_conv(bn, conv):
    a = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    c = bn.bias.detach() - bn.running_mean * a
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * a[:, None, None, None])    # dim 0, as for BN after a conv
        folded.bias.copy_(conv.bias + (conv.weight * c[None, :, None, None]).sum(dim=(1, 2, 3)))
    return folded
