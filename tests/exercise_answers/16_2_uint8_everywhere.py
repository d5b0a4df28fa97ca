# expect: zero_point\.dtype \(signed, per tensor\) is torch\.uint8.*a signed quantizer keeps int8
def onnx_qparams(quantizer):
    scale = (quantizer.amax.detach() / quantizer.quant_max).float()
    scale = scale.reshape(()) if scale.numel() == 1 else scale.flatten()
    return scale, torch.zeros(scale.shape, dtype=torch.uint8)
