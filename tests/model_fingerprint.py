"""What a failed or ``inplace=False`` call must leave unchanged: a model's fingerprint.

``fingerprint(model)`` records the repr, every state tensor (cloned), every
module (name, identity, type, training flag), every hook and each parameter's
``requires_grad``; ``assert_unchanged(model, before)`` compares a model with
it and names the first difference.
"""
from __future__ import annotations

import torch
from torch import nn


def fingerprint(model: nn.Module) -> dict:
    return {
        "repr": repr(model),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(name, id(m), type(m), m.training) for name, m in model.named_modules()],
        "hooks": [
            (name, list(m._forward_pre_hooks.items()), list(m._forward_hooks.items()),
             list(m._forward_pre_hooks_with_kwargs))
            for name, m in model.named_modules()
        ],
        "grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = fingerprint(model)
    assert after["repr"] == before["repr"], "the model's structure changed"
    assert after["modules"] == before["modules"], "a module was replaced, moved or switched train/eval"
    assert after["hooks"] == before["hooks"], "hooks were added or removed"
    assert after["grad"] == before["grad"], "requires_grad changed"
    assert after["state"].keys() == before["state"].keys(), "state dict keys changed"
    for key, value in before["state"].items():
        now = after["state"][key]
        assert now.dtype == value.dtype and torch.equal(now, value), key
