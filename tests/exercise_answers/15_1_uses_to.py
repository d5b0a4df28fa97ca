# expect: converts to bfloat16 \(Tensor.to\)
def round_to_bf16(x):
    return x.to(torch.bfloat16)                                           # the shortcut the prompt rules out (and bf16 out)
