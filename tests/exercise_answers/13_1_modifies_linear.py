# expect: linear was modified \(weight changed\)
def fuse_lora_linear(linear, lora_A, lora_B, alpha, lora_scale=1.0):
    r = lora_A.shape[0]
    with torch.no_grad():
        linear.weight.add_(lora_scale * (alpha / r) * (lora_B @ lora_A))
    return linear
