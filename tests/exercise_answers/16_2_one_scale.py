# expect: scale\.numel\(\) \(signed, per channel\).*one scale per channel
def onnx_qparams(quantizer):
    scale = (quantizer.amax.detach().max() / quantizer.quant_max).float().reshape(())
    return scale, torch.zeros((), dtype=torch.uint8 if quantizer.unsigned else torch.int8)
