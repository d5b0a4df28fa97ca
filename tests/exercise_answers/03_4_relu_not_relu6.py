# expect: outputs go up to [0-9.]+: values above 6 are not clipped
def conv_bn_relu6_fuser(is_qat, conv, bn, relu6):
    return nn.Sequential(fusion.fuse_conv_bn_eval(conv, bn), nn.ReLU())
