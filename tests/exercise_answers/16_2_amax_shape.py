# expect: scale \(signed, per channel\) has shape \(3, 1, 1, 1\): a per-channel scale has one dimension
def onnx_qparams(quantizer):
    scale = (quantizer.amax.detach() / quantizer.quant_max).float()
    scale = scale.reshape(()) if scale.numel() == 1 else scale      # keeps amax's [C, 1, 1, 1]
    return scale, torch.zeros(scale.shape, dtype=torch.uint8 if quantizer.unsigned else torch.int8)
