# expect: That is max calibration
def best_amax(x, num_bits, candidates):
    return float(max(candidates))                                     # amax = max |x|, no search
