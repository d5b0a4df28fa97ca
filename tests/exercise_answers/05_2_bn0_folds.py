# expect: predicted_fused is 3: that is too large\. A BatchNorm1d folds into
predicted_fused = 3          # every BatchNorm1d
predicted_left = 0
mlp_folded = ffx.fuse_conv_bn(mlp)
nodes_removed = len(fx.symbolic_trace(mlp).graph.nodes) - len(mlp_folded.graph.nodes)
