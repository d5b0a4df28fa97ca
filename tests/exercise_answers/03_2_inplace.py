# expect: mlp_fused is mlp itself: inplace=True fused mlp in place
my_linear_relu = fusion.LinearReLU(copy.deepcopy(mlp[0]), copy.deepcopy(mlp[1]))
mlp_fused = fusion.fuse_modules(mlp, ["0", "1"], inplace=True)
