# expect: That is qmax / amax \(quant_scale\)
def onnx_qparams(quantizer):
    scale = (quantizer.quant_max / quantizer.amax.detach()).float()
    scale = scale.reshape(()) if scale.numel() == 1 else scale.flatten()
    return scale, torch.zeros(scale.shape, dtype=torch.uint8 if quantizer.unsigned else torch.int8)
