# expect: converts to bfloat16 \(Tensor.to\).*integer operations
def round_to_bf16(x):
    return x.to(torch.bfloat16).float()                                   # the shortcut the prompt rules out
