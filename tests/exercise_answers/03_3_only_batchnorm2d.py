# expect: unfused_batchnorms\(a small model\) misses \['bn', 'head\.1'\] \(BatchNorm1d, BatchNorm1d\)\. Look for every BatchNorm kind
def unfused_batchnorms(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
