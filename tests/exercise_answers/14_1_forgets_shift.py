# expect: folded bias is off.*the BatchNorm's shift
def fold_bn_into_grouped_conv(bn, conv):
    # the weights are right, but the BatchNorm's shift c never reaches the bias
    a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w = conv.weight.double()
    out_channels, per_group = w.shape[0], w.shape[1]
    first = torch.arange(out_channels) // (out_channels // conv.groups) * per_group
    channel = first[:, None] + torch.arange(per_group)[None, :]
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter((w * a[channel][:, :, None, None]).float())
    return folded
