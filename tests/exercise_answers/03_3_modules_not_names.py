# expect: unfused_batchnorms\(incomplete\) holds \['BatchNorm2d', 'BatchNorm2d', 'BatchNorm2d'\]: return the dotted names
def unfused_batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
