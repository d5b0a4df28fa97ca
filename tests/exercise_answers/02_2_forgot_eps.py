# expect: the folded conv: weight is off by .*bias is off by .*Did you forget eps\? a = γ/√\(σ² \+ ε\), and this BatchNorm has eps = 0\.1
def fold_bn_into_next_conv(bn, conv):
    a = bn.weight.detach() / torch.sqrt(bn.running_var)             # eps forgotten
    c = bn.bias.detach() - bn.running_mean * a
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * a[None, :, None, None])
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        folded.bias = nn.Parameter(bias + (conv.weight * c[None, :, None, None]).sum(dim=(1, 2, 3)))
    return folded
