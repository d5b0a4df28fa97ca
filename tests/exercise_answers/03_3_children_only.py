# expect: unfused_batchnorms\(incomplete\) misses \['layer2\.0\.downsample\.1', .*Search the whole tree with model\.named_modules\(\)
def unfused_batchnorms(model):
    return [name for name, m in model.named_children() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
