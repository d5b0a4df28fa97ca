# expect: F.conv2d\(x, kernel, stride=2, padding=1\) is off.*lora_B as \[C_out, r\] times lora_A as \[r, C_in\*k\*k\]
def lora_conv_kernel(lora_A, lora_B):
    r, c_in, kh, kw = lora_A.shape
    c_out = lora_B.shape[0]
    product = lora_B.reshape(c_out, r) @ lora_A.reshape(r, c_in * kh * kw)
    return product.reshape(c_in, c_out, kh, kw).transpose(0, 1)
