# expect: mlp_fused holds \['Linear', 'ReLU', 'Linear'\], expected \['LinearReLU', 'Identity', 'Linear'\]
mlp_fused = copy.deepcopy(mlp)
my_linear_relu = fusion.LinearReLU(copy.deepcopy(mlp[0]), copy.deepcopy(mlp[1]))
