# expect: truncates.*add half of the dropped part
def round_to_bf16(x):
    bits = x.view(torch.int32)
    return (bits & ~0xFFFF).view(torch.float32)                           # drops the low 16 bits: rounds toward zero
