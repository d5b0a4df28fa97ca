# expect: convolution\(s\) are still float, e\.g\. \['
def build_conv_only(name):
    with quant.enable_quantization(float_module_list=["Conv2d"]):            # the opposite of what was asked
        return models.build(name, num_classes=10)
