# expect: quantize_linear\(x, 0\.5, 0, torch\.uint8\) is wrong.*Saturate: .*the range of torch\.uint8
def quantize_linear(x, scale, zero_point, dtype):
    q = torch.round(x / scale) + zero_point
    if dtype == torch.int8:
        q = torch.clamp(q, -128, 127)      # saturates int8 only; uint8 wraps around
    return q.to(dtype)
