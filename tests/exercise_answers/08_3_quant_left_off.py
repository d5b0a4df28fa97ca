# expect: 0\.input_quantizer: quantization is still off; enable_quant\(\) after loading amax
def calibrate_max(model, batches):
    quantizers = [m for m in model.modules() if isinstance(m, quant.TensorQuantizer)]
    for q in quantizers:
        q.enable_calib()
        q.disable_quant()
    with torch.no_grad():
        for x in batches:
            model(x)
    for q in quantizers:
        q.load_calib_amax()
        q.disable_calib()                     # quantization never switched back on
    return model
