# expect: Round to the nearest integer: converting with \.to\(dtype\) alone cuts toward zero
def quantize_linear(x, scale, zero_point, dtype):
    info = torch.iinfo(dtype)
    return torch.clamp(torch.trunc(x / scale) + zero_point, info.min, info.max).to(dtype)
