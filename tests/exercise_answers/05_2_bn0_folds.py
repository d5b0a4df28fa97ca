# expect: predicted_fused is 3 \(\+1\), expected 2\. A BatchNorm1d folds into the Linear whose output it reads
predicted_fused = 3          # every BatchNorm1d
predicted_left = 0
mlp_folded = ffx.fuse_conv_bn(mlp)
nodes_removed = len(fx.symbolic_trace(mlp).graph.nodes) - len(mlp_folded.graph.nodes)
