# expect: scale \(unsigned, per tensor\) is too large: scale = quantizer\.amax / quantizer\.quant_max
def onnx_qparams(quantizer):
    scale = (quantizer.amax.detach() / 127).float()                  # 127 for every quantizer
    scale = scale.reshape(()) if scale.numel() == 1 else scale.flatten()
    return scale, torch.zeros(scale.shape, dtype=torch.uint8 if quantizer.unsigned else torch.int8)
