# expect: best amax at 8 bits: quantize with num_bits
def best_amax(x, num_bits, candidates):
    errors = [float(((quant.fake_quantize(x, a, 8, unsigned=True) - x) ** 2).mean()) for a in candidates]   # 8, not num_bits
    return float(candidates[min(range(len(candidates)), key=errors.__getitem__)])
