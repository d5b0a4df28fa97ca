# expect: lora_conv_kernel\(lora_A, lora_B\)\.shape is \(6, 4\): too few items \(2\)\.
def lora_conv_kernel(lora_A, lora_B):
    return lora_B[:, :, 0, 0] @ lora_A.sum(dim=(2, 3))
