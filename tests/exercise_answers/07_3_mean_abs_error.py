# expect: mean absolute error; the exercise asks for the mean squared error
def best_amax(x, num_bits, candidates):
    errors = [float((quant.fake_quantize(x, a, num_bits, unsigned=True) - x).abs().mean()) for a in candidates]
    return float(candidates[min(range(len(candidates)), key=errors.__getitem__)])
