# expect: mlp_folded shares the modules '0' \(mlp\[0\]\).*inplace=True.*keep the default inplace=False
predicted_fused = 2
predicted_left = 1
mlp_folded = ffx.fuse_conv_bn(mlp, inplace=True)
nodes_removed = len(fx.symbolic_trace(mlp).graph.nodes) - len(mlp_folded.graph.nodes)
