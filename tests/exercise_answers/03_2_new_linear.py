# expect: my_linear_relu\(x\), against mlp\[1\]\(mlp\[0\]\(x\)\) is off: .*Use copies of mlp's own modules
mlp_fused = fusion.fuse_modules(mlp, ["0", "1"])
my_linear_relu = fusion.LinearReLU(nn.Linear(20, 30), nn.ReLU())
