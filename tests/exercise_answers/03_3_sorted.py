# expect: unfused_batchnorms\(a small model\) is .*Same names, other order
def unfused_batchnorms(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
