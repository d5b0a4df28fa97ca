# expect: This is per-tensor: one amax for the whole weight
def fake_quant_per_channel(weight, num_bits):
    amax = weight.abs().max()                                         # one amax for every channel
    return quant.fake_quantize(weight, amax, num_bits)
