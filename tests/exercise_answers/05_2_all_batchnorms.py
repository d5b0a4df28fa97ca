# expect: nodes_removed is 3: that is too large\. The traced mlp has 10 gra
predicted_fused = 2
predicted_left = 1
mlp_folded = ffx.fuse_conv_bn(mlp)
nodes_removed = sum(isinstance(m, nn.BatchNorm1d) for m in mlp)   # "every BatchNorm node goes"
