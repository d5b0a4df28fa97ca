# expect: Square the error before averaging
def best_amax(x, num_bits, candidates):
    errors = [float((quant.fake_quantize(x, a, num_bits, unsigned=True) - x).mean()) for a in candidates]   # signed mean
    return float(candidates[min(range(len(candidates)), key=errors.__getitem__)])
