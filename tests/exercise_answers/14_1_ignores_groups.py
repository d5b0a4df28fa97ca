# expect: folded weight is off.*with groups, that is not j
def fold_bn_into_grouped_conv(bn, conv):
    # W[o, j] scaled by a[j]: right for groups=1, wrong for every group but the first
    a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    c = bn.bias.double() - bn.running_mean.double() * a
    w = conv.weight.double()
    per_group = w.shape[1]
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter((w * a[:per_group].reshape(1, -1, 1, 1)).float())
    folded.bias = nn.Parameter((conv.bias.double() + (w.sum(dim=(2, 3)) * c[:per_group]).sum(1)).float())
    return folded
