# expect: Each output channel \(dim 0\) needs its own amax
def fake_quant_per_channel(weight, num_bits):
    amax = weight.abs().amax(dim=(0, 2, 3), keepdim=True)             # per input channel
    return quant.fake_quantize(weight, amax, num_bits)
