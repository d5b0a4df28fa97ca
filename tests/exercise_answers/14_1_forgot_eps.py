# expect: folded weight is off.*forgot eps
def fold_bn_into_grouped_conv(bn, conv):
    # a = γ/√σ²: right when eps is negligible, far off for this BatchNorm's large eps and tiny variances
    a = bn.weight.double() / torch.sqrt(bn.running_var.double())
    c = bn.bias.double() - bn.running_mean.double() * a
    w = conv.weight.double()
    out_channels, per_group = w.shape[0], w.shape[1]
    first = torch.arange(out_channels) // (out_channels // conv.groups) * per_group
    channel = first[:, None] + torch.arange(per_group)[None, :]
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter((w * a[channel][:, :, None, None]).float())
    folded.bias = nn.Parameter((conv.bias.double() + (w.sum(dim=(2, 3)) * c[channel]).sum(1)).float())
    return folded
