# expect: converts to bfloat16 \(Tensor.bfloat16\)
def round_to_bf16(x):
    return x.bfloat16().float()                                           # the same shortcut, as a method
