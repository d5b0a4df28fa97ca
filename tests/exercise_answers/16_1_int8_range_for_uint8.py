# expect: saturate to the range of torch\.int8, but this result is torch\.uint8
def quantize_linear(x, scale, zero_point, dtype):
    return torch.clamp(torch.round(x / scale) + zero_point, -128, 127).to(dtype)   # int8's range, whatever the dtype
