# expect: the loss with batchmean and alpha_batchmean is off
alpha_batchmean = 0.5
