# expect: alpha_batchmean should be a plain Python float, not a Tensor
alpha_batchmean = torch.tensor(0.5 * 32)
