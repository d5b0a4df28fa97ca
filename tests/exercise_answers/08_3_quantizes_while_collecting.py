# expect: a quantizer quantized while it was collecting statistics.*disable_quant\(\)
def calibrate_max(model, batches):
    quantizers = [m for m in model.modules() if isinstance(m, quant.TensorQuantizer)]
    for q in quantizers:
        q.enable_calib()                      # quantization stays on, with no amax yet
    with torch.no_grad():
        for x in batches:
            model(x)
    for q in quantizers:
        q.load_calib_amax()
        q.disable_calib()
    return model
