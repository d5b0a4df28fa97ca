# expect: goes the wrong way
alpha_batchmean = 0.5 / 32
