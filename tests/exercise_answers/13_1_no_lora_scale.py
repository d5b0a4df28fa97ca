# expect: the fused linear: weight is off.*lora_scale multiplies the update too
def fuse_lora_linear(linear, lora_A, lora_B, alpha, lora_scale=1.0):
    r = lora_A.shape[0]
    fused_layer = copy.deepcopy(linear)
    with torch.no_grad():
        fused_layer.weight.add_((alpha / r) * (lora_B @ lora_A))        # lambda left out
    return fused_layer
