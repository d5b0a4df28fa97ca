# expect: the loss with batchmean and alpha_batchmean is off \(too small\): with the same alpha, batchmean divides the summed KL by the batch size
alpha_batchmean = 0.5
