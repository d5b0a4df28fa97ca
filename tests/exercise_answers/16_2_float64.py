# expect: scale \(signed, per tensor\) is torch\.float64: ONNX's QuantizeLinear takes a float32 scale
def onnx_qparams(quantizer):
    scale = quantizer.amax.detach().double() / quantizer.quant_max
    scale = scale.reshape(()) if scale.numel() == 1 else scale.flatten()
    return scale, torch.zeros(scale.shape, dtype=torch.uint8 if quantizer.unsigned else torch.int8)
