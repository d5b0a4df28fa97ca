# expect: zero_point .*signed, per tensor.*the 128 of notebook 11
def onnx_qparams(quantizer):
    scale = (quantizer.amax.detach() / quantizer.quant_max).float()
    scale = scale.reshape(()) if scale.numel() == 1 else scale.flatten()
    return scale, torch.full(scale.shape, 0 if quantizer.unsigned else 128, dtype=torch.uint8)   # torch's quint8 habit
