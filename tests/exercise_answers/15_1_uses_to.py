# expect: dtype.*Return float32 values
def round_to_bf16(x):
    return x.to(torch.bfloat16)                                           # a bf16 tensor, not float32 values
