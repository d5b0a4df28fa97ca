# expect: layer '0' was not named but its input_quantizer is off
def keep_in_float(model, layer_names):
    for module in model.modules():                            # every quantizer, not only the named layers'
        if isinstance(module, quant.TensorQuantizer):
            module.disable()
