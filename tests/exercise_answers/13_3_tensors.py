# expect: w_deployed should be a plain Python float, not a Tensor
k = torch.tensor(2.0) / torch.tensor(15.0 + 1.0).sqrt()
w_deployed = (2 + (2 / 1) * 3 * 0.5) * k
b_deployed = (0 - 1) * k + 1
