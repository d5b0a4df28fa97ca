# expect: layer '2': its input_quantizer still quantizes
def keep_in_float(model, layer_names):
    for name in layer_names:
        model.get_submodule(name).weight_quantizer.disable()  # the input stays quantized
