# expect: best amax on the signed grid.*unsigned=True
def best_amax(x, num_bits, candidates):
    errors = [float(((quant.fake_quantize(x, a, num_bits) - x) ** 2).mean()) for a in candidates]   # signed grid
    return float(candidates[min(range(len(candidates)), key=errors.__getitem__)])
