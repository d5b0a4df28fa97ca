# expect: only convolutions should be quantized, but the model has \['Quant
def build_conv_only(name):
    with quant.enable_quantization(float_module_list=["Linear", "Conv1d"]):   # the pooling layers are quantized too
        return models.build(name, num_classes=10)
