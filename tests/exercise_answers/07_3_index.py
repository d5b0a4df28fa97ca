# expect: right candidate.s index: return the amax itself
def best_amax(x, num_bits, candidates):
    errors = [float(((quant.fake_quantize(x, a, num_bits, unsigned=True) - x) ** 2).mean()) for a in candidates]
    return min(range(len(candidates)), key=errors.__getitem__)        # the index, not the value
