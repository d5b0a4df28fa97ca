# expect: scale \(signed, per tensor\) has shape \(1,\): a per-tensor scale is a 0-d tensor
def onnx_qparams(quantizer):
    scale = (quantizer.amax.detach() / quantizer.quant_max).float().flatten()
    return scale, torch.zeros(scale.shape, dtype=torch.uint8 if quantizer.unsigned else torch.int8)
