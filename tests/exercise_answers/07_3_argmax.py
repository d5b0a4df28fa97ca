# expect: That is the largest error: take the minimum
def best_amax(x, num_bits, candidates):
    errors = [float(((quant.fake_quantize(x, a, num_bits, unsigned=True) - x) ** 2).mean()) for a in candidates]
    return float(candidates[max(range(len(candidates)), key=errors.__getitem__)])
