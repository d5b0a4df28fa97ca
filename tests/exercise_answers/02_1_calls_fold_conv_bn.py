# expect: fold_conv1d_bn1d calls fold_conv_bn: this exercise asks for the fold written by hand
def fold_conv1d_bn1d(conv, bn):
    return fold_conv_bn(conv, bn)
