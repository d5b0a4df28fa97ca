# expect: dtype is torch.bfloat16.*Return float32 values
def round_to_bf16(x):
    bits = x.view(torch.int32).to(torch.int64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16                     # rounded right, then kept as 16 bits
    return bits.to(torch.int16).view(torch.bfloat16)                      # a bf16 tensor, not float32 values
