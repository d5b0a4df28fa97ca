# expect: takes an axis argument
def fake_quant_per_channel(weight, num_bits):
    amax = weight.abs().amax(dim=(1, 2, 3), keepdim=True)             # the teaching cell's line, no axis
    return quant.fake_quantize(weight, amax, num_bits)
