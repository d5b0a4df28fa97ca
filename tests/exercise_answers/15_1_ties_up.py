# expect: exact ties.*ties to even
def round_to_bf16(x):
    bits = x.view(torch.int32).to(torch.int64)
    bits = (bits + 0x8000) & ~0xFFFF                                      # half up: ties away from zero, not to even
    return bits.to(torch.int32).view(torch.float32)
