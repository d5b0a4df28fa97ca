# expect: plain Python float, not a tensor
def percentile_amax(counts, edges, percentile):
    share = torch.cumsum(counts, 0) / counts.sum()
    i = int(torch.searchsorted(share, torch.tensor(percentile / 100, dtype=share.dtype)))
    return edges[i + 1]                                       # a 0-d tensor
