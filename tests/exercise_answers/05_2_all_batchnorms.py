# expect: nodes_removed is 3 \(\+1\), expected 2\. The traced mlp has 10 graph nodes and mlp_folded 8: count graph nodes
predicted_fused = 2
predicted_left = 1
mlp_folded = ffx.fuse_conv_bn(mlp)
nodes_removed = sum(isinstance(m, nn.BatchNorm1d) for m in mlp)   # "every BatchNorm node goes"
