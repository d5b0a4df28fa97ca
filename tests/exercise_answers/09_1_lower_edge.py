# expect: is too small: that is the bin.s lower edge.*edges\[i \+ 1\]
def percentile_amax(counts, edges, percentile):
    share = torch.cumsum(counts, 0) / counts.sum()
    i = int(torch.searchsorted(share, torch.tensor(percentile / 100, dtype=share.dtype)))
    return float(edges[i])                                    # the bin's lower edge
