# expect: Saturate: clamp to the dtype's range
def quantize_linear(x, scale, zero_point, dtype):
    return (torch.round(x / scale) + zero_point).to(dtype)     # 400 wraps around instead of stopping at 127
