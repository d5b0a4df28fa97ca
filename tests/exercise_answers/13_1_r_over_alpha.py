# expect: the fused linear: weight is off.*alpha / r = 8 / 2, not r / alpha
def fuse_lora_linear(linear, lora_A, lora_B, alpha, lora_scale=1.0):
    r = lora_A.shape[0]
    fused_layer = copy.deepcopy(linear)
    with torch.no_grad():
        fused_layer.weight.add_(lora_scale * (r / alpha) * (lora_B @ lora_A))
    return fused_layer
