"""Test helper: BatchNorm layers with non-trivial statistics (fresh ones are mean 0, var 1, gamma 1, beta 0)."""
from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, seed: int = 0, random_eps: bool = False) -> nn.Module:
    """Running mean ~ N(0, 0.1), var ~ U(0.5, 2), gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1); eps ~ 10^U(-5, -1) if asked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if random_eps:
                    m.eps = float(10 ** (-5 + 4 * torch.rand(1, generator=g)))
    return model
