# expect: torch.nn is still patched after build_conv_only returned
def build_conv_only(name):
    quant.initialize(float_module_list=["Linear", "AdaptiveAvgPool2d", "AvgPool2d"])
    return models.build(name, num_classes=10)
