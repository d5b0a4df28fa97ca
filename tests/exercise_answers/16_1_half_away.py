# expect: Ties go to the even integer
def quantize_linear(x, scale, zero_point, dtype):
    info = torch.iinfo(dtype)
    return torch.clamp(torch.floor(x / scale + 0.5) + zero_point, info.min, info.max).to(dtype)
