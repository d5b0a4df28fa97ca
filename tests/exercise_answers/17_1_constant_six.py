# expect: every threshold is 6
import torch


def clip_thresholds(s):
    return torch.full_like(s, 6.0)    # ReLU6 kept as it is
