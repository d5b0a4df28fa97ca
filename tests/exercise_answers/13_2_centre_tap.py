# expect: F.conv2d\(x, kernel, stride=2, padding=1\) is off.*not only the centre one
def lora_conv_kernel(lora_A, lora_B):
    r, c_in, kh, kw = lora_A.shape
    c_out = lora_B.shape[0]
    kernel = torch.zeros(c_out, c_in, kh, kw, dtype=lora_A.dtype)
    kernel[:, :, kh // 2, kw // 2] = lora_B.reshape(c_out, r) @ lora_A[:, :, kh // 2, kw // 2]
    return kernel
