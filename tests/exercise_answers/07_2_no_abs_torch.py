# expect: Channel 1 is all negative: amax is the largest magnitude
def fake_quant_per_channel(weight, num_bits, axis=0):
    others = [d for d in range(weight.dim()) if d != axis]
    amax = weight.amax(dim=others)                                    # max w, not max |w|
    qmax = 2 ** (num_bits - 1) - 1
    return torch.fake_quantize_per_channel_affine(weight, amax / qmax, torch.zeros(amax.numel(), dtype=torch.int32),
                                                  axis, -qmax, qmax)
