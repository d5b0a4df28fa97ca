# expect: the merged conv.*centre \(k//2, k//2\).*not at a corner
def merge_1x1_into_kxk(conv_kxk, conv_1x1):
    k = conv_kxk.kernel_size[0]
    merged = copy.deepcopy(conv_kxk)
    with torch.no_grad():
        merged.weight.add_(F.pad(conv_1x1.weight, (0, k - 1, 0, k - 1)))    # the 1x1 tap at (0, 0)
        merged.bias.add_(conv_1x1.bias)
    return merged
