# expect: folded weight is off.*input channel it reads
def fold_bn_into_grouped_conv(bn, conv):
    # notebook 02's fold: scales each *output* channel, the direction of a BatchNorm after the conv
    a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    c = bn.bias.double() - bn.running_mean.double() * a
    w = conv.weight.double()
    folded = copy.deepcopy(conv)
    a_out = torch.cat([a, a])[: w.shape[0]]
    folded.weight = nn.Parameter((w * a_out[:, None, None, None]).float())
    folded.bias = nn.Parameter((conv.bias.double() + w.sum(dim=(1, 2, 3)) * c[: w.shape[0]]).float())
    return folded
