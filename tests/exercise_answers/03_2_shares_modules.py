# expect: my_linear_relu\[0\] is mlp\[0\] itself, not a copy
mlp_fused = fusion.fuse_modules(mlp, ["0", "1"])
my_linear_relu = fusion.LinearReLU(mlp[0], mlp[1])
