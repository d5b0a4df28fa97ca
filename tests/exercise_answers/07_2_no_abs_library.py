# expect: Channel 1 is all negative: amax is the largest magnitude
def fake_quant_per_channel(weight, num_bits, axis=0):
    others = [d for d in range(weight.dim()) if d != axis]
    amax = weight.amax(dim=others, keepdim=True)                      # max w, not max |w|
    return quant.fake_quantize(weight, amax, num_bits)
