# expect: percentile_amax\(counts, edges, 99\.99\) is too small: .*cumulative share \(cumulative count / total\)
def percentile_amax(counts, edges, percentile):
    cumulative = torch.cumsum(counts, 0)                       # counts, never divided by the total
    i = int(torch.argmax((cumulative >= percentile / 100).int()))
    return float(edges[i + 1])
