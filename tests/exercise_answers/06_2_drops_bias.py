# expect: the merged conv.*bias.*b_kxk \+ b_1x1: both convs have a bias
def merge_1x1_into_kxk(conv_kxk, conv_1x1):
    k = conv_kxk.kernel_size[0]
    merged = copy.deepcopy(conv_kxk)
    with torch.no_grad():
        merged.weight.add_(F.pad(conv_1x1.weight, [k // 2] * 4))
    return merged                                                           # keeps only conv_kxk's bias
