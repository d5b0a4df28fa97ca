# expect: the fused module still contains a BatchNorm \(\['1'\]\)
def conv_bn_relu6_fuser(is_qat, conv, bn, relu6):
    return nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), copy.deepcopy(relu6))
