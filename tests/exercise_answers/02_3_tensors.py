# expect: w_folded and b_folded should be plain Python numbers, not tensors
k = 4 / torch.sqrt(torch.tensor(3.0 + 1.0))
w_folded = torch.tensor([1.5, -0.25]) * k
b_folded = (0.5 - 2) * k + 1
