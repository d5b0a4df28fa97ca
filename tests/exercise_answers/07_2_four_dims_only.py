# expect: Linear weight.*every dim except axis, whatever the weight's rank
def fake_quant_per_channel(weight, num_bits, axis=0):
    others = [d for d in (0, 1, 2, 3) if d != axis]                   # assumes a 4-d weight
    amax = weight.abs().amax(dim=others, keepdim=True)
    return quant.fake_quantize(weight, amax, num_bits)
