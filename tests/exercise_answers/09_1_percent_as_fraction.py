# expect: percentile is in percent.*percentile / 100
def percentile_amax(counts, edges, percentile):
    share = torch.cumsum(counts, 0) / counts.sum()
    i = int(torch.argmax((share >= percentile).int()))        # 99.99 compared with a share in [0, 1]
    return float(edges[i + 1])
