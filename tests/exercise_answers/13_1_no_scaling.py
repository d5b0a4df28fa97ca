# expect: the fused linear: weight is off.*you left the scaling out
def fuse_lora_linear(linear, lora_A, lora_B, alpha, lora_scale=1.0):
    fused_layer = copy.deepcopy(linear)
    with torch.no_grad():
        fused_layer.weight.add_(lora_scale * (lora_B @ lora_A))
    return fused_layer
