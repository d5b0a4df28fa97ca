# expect: Channel 1 is all negative: amax is the largest magnitude
def fake_quant_per_channel(weight, num_bits):
    qmax = 2 ** (num_bits - 1) - 1
    amax = weight.amax(dim=(1, 2, 3), keepdim=True)                   # max w, not max |w|
    s = amax / qmax
    return torch.clamp(torch.round(weight / s), -qmax, qmax) * s
