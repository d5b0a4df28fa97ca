# expect: fold_conv1d_bn1d calls fusionlib\.folding\.fuse_conv_bn_eval
from fusionlib.fusion import fuse_conv_bn_eval as my_fold


def fold_conv1d_bn1d(conv, bn):
    return my_fold(conv, bn)
