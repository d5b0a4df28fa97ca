# expect: ConvTranspose2d weight.*use axis instead of fixed dims
def fake_quant_per_channel(weight, num_bits, axis=0):
    amax = weight.abs().amax(dim=(1, 2, 3), keepdim=True)             # the conv case only: axis is ignored
    return quant.fake_quantize(weight, amax, num_bits)
