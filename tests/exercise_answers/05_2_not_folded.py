# expect: mlp_folded still calls the BatchNorms \['0', '2', '5'\], of which fuse_conv_bn leaves 1
predicted_fused = 2
predicted_left = 1
mlp_folded = fx.symbolic_trace(mlp)          # traced, but nothing folded
nodes_removed = len(fx.symbolic_trace(mlp).graph.nodes) - len(mlp_folded.graph.nodes)
