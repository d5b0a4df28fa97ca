"""fusionlib.modules: the hook policy (carry_forward_hooks / warn_dropped_hooks)."""
import pytest
import torch
from torch import nn

from fusionlib.modules import carry_forward_hooks, hook_names, warn_dropped_hooks


def test_carry_forward_hooks_keeps_every_variant_and_its_handle():
    old, new = nn.Linear(2, 2), nn.Linear(2, 2)
    calls = []
    pre = old.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    old.register_forward_pre_hook(lambda m, a, kw: calls.append("pre_kw"), with_kwargs=True)
    old.register_forward_hook(lambda m, a, kw, out: calls.append("fwd_kw"), with_kwargs=True)
    old.register_forward_hook(lambda m, a, out: calls.append("always"), always_call=True)
    new.register_forward_hook(lambda m, a, out: calls.append("own"))
    carry_forward_hooks(old, new)
    new(torch.zeros(1, 2))
    assert calls == ["pre", "pre_kw", "fwd_kw", "always", "own"]
    calls.clear()
    old(torch.zeros(1, 2))  # moved, not copied: a replaced module living on inside its replacement runs none
    assert calls == []
    pre.remove()  # a handle from the replaced module still removes its hook from the replacement
    calls.clear()
    new(torch.zeros(1, 2))
    assert calls == ["pre_kw", "fwd_kw", "always", "own"]


def test_carry_forward_hooks_names_backward_hooks_it_cannot_carry():
    old = nn.Linear(2, 2)
    old.register_full_backward_hook(lambda m, gi, go: None)
    with pytest.warns(UserWarning, match=r"backward hook .*'fc'"):
        carry_forward_hooks(old, nn.Linear(2, 2), "fc")


def test_warn_dropped_hooks_names_the_hook_and_the_module_or_raises():
    bn = nn.BatchNorm2d(2)

    def log_stats(m, a, out):
        pass

    warn_dropped_hooks(bn, "bn1", "absorbed")  # no hooks: silent
    bn.register_forward_hook(log_stats)
    assert hook_names(bn) == ["forward hook 'test_warn_dropped_hooks_names_the_hook_and_the_module_or_raises.<locals>.log_stats'"]
    with pytest.warns(UserWarning, match=r"log_stats.*'bn1' \(BatchNorm2d\) is dropped: folded into conv1"):
        warn_dropped_hooks(bn, "bn1", "folded into conv1")
    with pytest.raises(ValueError, match=r"'bn1' \(BatchNorm2d\) carries forward hook .*log_stats"):
        warn_dropped_hooks(bn, "bn1", "folded into conv1", error=True)


def test_carry_forward_hooks_takes_only_the_kinds_asked_and_names_the_rest():
    conv, fused = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)
    conv.register_forward_pre_hook(lambda m, a: None)

    def after_conv(m, a, out):
        pass

    conv.register_forward_hook(after_conv)
    with pytest.warns(UserWarning, match=r"forward hook .*after_conv.* on 'block.conv' \(Conv2d\) is dropped"):
        carry_forward_hooks(conv, fused, "block.conv", kinds=("forward_pre",))
    assert len(fused._forward_pre_hooks) == 1 and not fused._forward_hooks
