"""fusionlib.lora: the merge formula, idempotent fuse, exact unfuse, lora_scale, conv adapters, the plain merged model."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusionlib import data, lora, models, zoo
from fusionlib.lora import (
    LoRAConv2d,
    LoRALinear,
    dense_layer_names,
    fuse_lora,
    inject_lora,
    lora_delta,
    lora_layers,
    merge_and_unload,
    merge_lora_weight,
    unfuse_lora,
)
from fusionlib.verify import compare_outputs
from batchnorm_stats import randomize_batchnorm
from model_fingerprint import assert_unchanged, fingerprint

RTOL = 1e-5  # fused / merged vs unfused adapters, fp32, relative to the largest output


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Give every lora_B random values (it starts at zero, which would hide a wrong merge)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator, dtype=layer.lora_B.dtype) * std)
    return model


def toy_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),                       # depthwise: no adapter fits
        nn.Conv2d(8, 16, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return randomize_batchnorm(model, seed=0).eval()


# ----------------------------------------------------------------------------- the arithmetic
def test_lora_delta_linear_is_scaled_b_times_a_in_float64():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 7, generator=generator), torch.randn(5, 3, generator=generator)
    delta = lora_delta(a, b, scaling=2.5, lora_scale=0.4)
    assert delta.dtype == torch.float64 and delta.shape == (5, 7)
    torch.testing.assert_close(delta, 0.4 * 2.5 * (b.double() @ a.double()), rtol=1e-15, atol=0)


def test_merge_lora_weight_rounds_once_and_keeps_the_weights_layout():
    generator = torch.Generator().manual_seed(2)
    w = torch.randn(6, 4, 3, 3, generator=generator).to(memory_format=torch.channels_last)
    a, b = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(6, 2, 1, 1, generator=generator)
    before = w.clone()
    merged = merge_lora_weight(w, a, b, scaling=1.5, lora_scale=2.0)
    exact = w.double() + 3.0 * torch.einsum("oj,juvw->ouvw", b.double()[:, :, 0, 0], a.double())
    assert merged.dtype == torch.float32 and torch.equal(merged, exact.float())  # one rounding
    assert merged.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(w, before)  # the input weight is not modified
    with pytest.raises(ValueError, match=r"lora_B of shape \(6, 3, 1, 1\) does not fit lora_A of shape \(2, 4, 3, 3\)"):
        merge_lora_weight(w, a, torch.zeros(6, 3, 1, 1), 1.0)
    with pytest.raises(ValueError, match=r"update B A has shape \(5, 4, 3, 3\) but the weight has shape \(6, 4, 3, 3\)"):
        merge_lora_weight(w, a, torch.zeros(5, 2, 1, 1), 1.0)


def test_merge_lora_weight_rounds_bf16_once_where_torchs_conversion_rounds_twice():
    """bf16: every merged weight is the nearest bf16 to the float64 sum (torch's float64 -> bf16 rounds twice)."""
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(512, 512, generator=generator).to(torch.bfloat16)
    a, b = torch.randn(8, 512, generator=generator), torch.randn(512, 8, generator=generator)
    merged = merge_lora_weight(w, a, b, scaling=0.37)
    exact = w.double() + 0.37 * (b.double() @ a.double())
    error = (merged.double() - exact).abs()
    for direction in (math.inf, -math.inf):
        neighbour = torch.nextafter(merged, torch.full_like(merged, direction)).double()
        assert bool(((neighbour - exact).abs() >= error).all())
    assert int((exact.to(torch.bfloat16) != merged).sum()) > 0  # the plain conversion misses somewhere


@pytest.mark.parametrize("kernel_size, stride, padding, dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2), ((1, 3), 2, (0, 1), 1), (1, 1, 0, 1), (3, 1, "same", 1),
])
def test_conv_merge_b_kron_a_is_the_two_convs(kernel_size, stride, padding, dilation):
    """B ⊛ (A ⋆ x) == (B ⊗ A) ⋆ x with A's stride / padding / dilation: the derivation, in float64."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, kernel_size, stride, padding, dilation).double()
    layer = LoRAConv2d(conv, r=3, alpha=6.0)
    randomize_adapters(layer, seed=3)
    x = torch.randn(2, 4, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        two_convs = F.conv2d(F.conv2d(x, layer.lora_A, None, stride, padding, dilation), layer.lora_B)
        kernel = torch.einsum("oj,jiuv->oiuv", layer.lora_B[:, :, 0, 0], layer.lora_A)  # (B ⊗ A)
        torch.testing.assert_close(layer.delta_weight(), layer.scaling * kernel, rtol=1e-14, atol=1e-16)
        one_conv = F.conv2d(x, kernel, None, stride, padding, dilation)
        torch.testing.assert_close(two_convs, one_conv, rtol=1e-12, atol=1e-12)
        unfused = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unfused, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the layers
def test_lora_linear_shapes_init_scaling_and_frozen_base():
    torch.manual_seed(4)
    base = nn.Linear(7, 5)
    layer = LoRALinear(base, r=3, alpha=12, dropout=0.1)
    assert layer.base is base and layer.lora_A.shape == (3, 7) and layer.lora_B.shape == (5, 3)
    assert layer.scaling == 4.0 and isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == 0.1
    assert not layer.lora_B.any() and layer.lora_A.abs().sum() > 0  # B = 0: training starts from the base layer
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    x = torch.randn(4, 7)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))
        randomize_adapters(layer)
        expected = base(x) + 4.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    assert isinstance(LoRALinear(nn.Linear(2, 2), 1, 1).dropout, nn.Identity)  # no dropout module when p = 0
    assert "r=3, alpha=12, scaling=4, dropout=0.1, unfused" in repr(layer)


def test_lora_conv_shapes_and_the_forward_formula():
    torch.manual_seed(5)
    base = nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1, bias=True)
    layer = LoRAConv2d(base, r=2, alpha=2).eval()
    assert layer.lora_A.shape == (2, 3, 3, 3) and layer.lora_B.shape == (8, 2, 1, 1) and layer.scaling == 1.0
    assert not layer.lora_B.any() and not base.weight.requires_grad
    randomize_adapters(layer)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = base(x) + F.conv2d(F.conv2d(x, layer.lora_A, stride=2, padding=1), layer.lora_B)
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_only_the_adapters_get_gradients():
    layer = randomize_adapters(LoRAConv2d(nn.Conv2d(3, 4, 3, padding=1), r=2, alpha=4))
    layer(torch.randn(2, 3, 6, 6)).square().sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


LAYER_BAD_INPUTS = {
    # name: (constructor, args, exception, message pattern)
    "rank_zero": (LoRALinear, (nn.Linear(4, 4), 0, 1.0), ValueError, r"r \(the adapter's rank\) must be a positive int, got 0"),
    "rank_negative": (LoRAConv2d, (nn.Conv2d(4, 4, 1), -2, 1.0), ValueError, r"positive int, got -2"),
    "rank_float": (LoRALinear, (nn.Linear(4, 4), 2.5, 1.0), ValueError, r"positive int, got 2.5"),
    "rank_bool": (LoRALinear, (nn.Linear(4, 4), True, 1.0), ValueError, r"positive int, got True"),
    "alpha_zero": (LoRALinear, (nn.Linear(4, 4), 2, 0), ValueError, r"alpha must be a positive finite number, got 0"),
    "alpha_negative": (LoRAConv2d, (nn.Conv2d(4, 4, 1), 2, -1.0), ValueError, r"alpha must be .* got -1.0"),
    "alpha_nan": (LoRALinear, (nn.Linear(4, 4), 2, math.nan), ValueError, r"alpha must be .* got nan"),
    "dropout_one": (LoRALinear, (nn.Linear(4, 4), 2, 2, 1.0), ValueError, r"dropout must be a probability in \[0, 1\), got 1.0"),
    "linear_on_conv": (LoRALinear, (nn.Conv2d(4, 4, 1), 2, 2), TypeError, r"LoRALinear wraps an nn.Linear, got Conv2d"),
    "conv_on_linear": (LoRAConv2d, (nn.Linear(4, 4), 2, 2), TypeError, r"LoRAConv2d wraps an nn.Conv2d, got Linear"),
    "depthwise": (LoRAConv2d, (nn.Conv2d(8, 8, 3, groups=8), 2, 2), ValueError,
                  r"dense conv \(groups=1\), got a depthwise conv with groups=8.*pointwise"),
    "grouped": (LoRAConv2d, (nn.Conv2d(8, 8, 3, groups=2), 2, 2), ValueError, r"got a grouped conv with groups=2"),
    "reflect_padding": (LoRAConv2d, (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 2, 2), ValueError,
                        r"padding_mode='zeros' only, got 'reflect'"),
}


@pytest.mark.parametrize("case", list(LAYER_BAD_INPUTS))
def test_bad_layer_arguments_are_rejected_and_the_base_is_untouched(case):
    constructor, args, error, pattern = LAYER_BAD_INPUTS[case]
    before = fingerprint(args[0])
    with pytest.raises(error, match=pattern):
        constructor(*args)
    assert_unchanged(args[0], before)  # in particular, not frozen


# ----------------------------------------------------------------------------- fuse / unfuse
@pytest.fixture
def adapted_toy():
    model = toy_model()
    before = fingerprint(model)
    adapted = randomize_adapters(inject_lora(model, dense_layer_names(model), r=2, alpha=4.0), seed=6)
    assert_unchanged(model, before)  # inplace=False
    return model, adapted


def test_dense_layer_names_skip_grouped_convs_and_existing_adapters(adapted_toy):
    model, adapted = adapted_toy
    assert dense_layer_names(model) == ["0", "5", "9"]
    assert list(lora_layers(adapted)) == ["0", "5", "9"]
    assert dense_layer_names(adapted) == []  # nothing left: '0.base' etc. are inside adapters


def test_fused_model_computes_the_unfused_model(adapted_toy):
    _, adapted = adapted_toy
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        unfused = adapted(x)
        assert fuse_lora(adapted) is adapted
        fused = adapted(x)
    assert all(layer.merged and layer.lora_scale == 1.0 for layer in lora_layers(adapted).values())
    result = compare_outputs(unfused, fused, rtol=RTOL, name="toy fused")
    assert result.passed, str(result)
    assert "fused, lora_scale=1" in repr(adapted)


def test_fuse_matches_the_formula_rounded_once(adapted_toy):
    _, adapted = adapted_toy
    originals = {name: layer.base.weight.detach().clone() for name, layer in lora_layers(adapted).items()}
    fuse_lora(adapted, lora_scale=0.7)
    for name, layer in lora_layers(adapted).items():
        a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(originals[name].shape)
        exact = originals[name].double() + 0.7 * layer.scaling * delta
        assert torch.equal(layer.base.weight, exact.float()), name


def test_fusing_twice_never_adds_twice_and_a_new_scale_replaces_the_old(adapted_toy):
    _, adapted = adapted_toy
    fuse_lora(adapted)
    once = {k: v.clone() for k, v in adapted.state_dict().items()}
    fuse_lora(adapted)
    assert all(torch.equal(adapted.state_dict()[k], v) for k, v in once.items())
    fuse_lora(adapted, lora_scale=3.0)
    fuse_lora(adapted, lora_scale=1.0)
    assert all(torch.equal(adapted.state_dict()[k], v) for k, v in once.items())


def test_unfuse_restores_the_original_weights_bit_for_bit(adapted_toy):
    _, adapted = adapted_toy
    adapted.eval()
    before = fingerprint(adapted)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = adapted(x)
        for scale in (1.0, 0.3, -2.0):
            fuse_lora(adapted, lora_scale=scale)
            assert not torch.equal(adapted[0].base.weight, before["state"]["0.base.weight"])
            assert unfuse_lora(adapted) is adapted
            assert_unchanged(adapted, before)
            assert torch.equal(adapted(x), reference)
    assert not any(layer.merged for layer in lora_layers(adapted).values())


def test_unfuse_of_a_model_never_fused_is_a_no_op_and_of_a_plain_model_an_error(adapted_toy):
    model, adapted = adapted_toy
    before = fingerprint(adapted)
    unfuse_lora(adapted)
    unfuse_lora(adapted)
    assert_unchanged(adapted, before)
    plain_before = fingerprint(model)
    for fn in (fuse_lora, unfuse_lora, merge_and_unload):
        with pytest.raises(ValueError, match=r"has no LoRA layers; call lora.inject_lora"):
            fn(model)
    assert_unchanged(model, plain_before)


def test_lora_scale_multiplies_the_update(adapted_toy):
    model, adapted = adapted_toy
    x = torch.randn(3, 3, 8, 8)
    fuse_lora(adapted, lora_scale=0.0)  # W + 0 rounds back to W: exactly the model without adapters
    with torch.no_grad():
        assert torch.equal(adapted(x), model(x))
    layer = randomize_adapters(LoRALinear(nn.Linear(6, 4), r=2, alpha=6), seed=9)
    h = torch.randn(5, 6)
    with torch.no_grad():
        update = layer.scaling * (h @ layer.lora_A.T @ layer.lora_B.T)
        for scale in (0.5, 2.0, -1.0):
            layer.merge(lora_scale=scale)
            torch.testing.assert_close(layer(h), layer.base.bias + h @ layer.weight_unfused.T + scale * update,
                                       rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"lora_scale must be a finite number.*got inf"):
        fuse_lora(adapted, lora_scale=math.inf)
    with pytest.raises(ValueError, match=r"lora_scale must be a finite number.*got '1'"):
        fuse_lora(adapted, lora_scale="1")
    assert all(layer.lora_scale == 0.0 for layer in lora_layers(adapted).values())  # the bad calls changed nothing


def test_fused_float64_model_is_exact_to_1e12():
    model = randomize_adapters(inject_lora(toy_model().double(), dense_layer_names(toy_model()), r=3, alpha=3), seed=7)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        fuse_lora(model)
        assert compare_outputs(reference, model(x), rtol=1e-12).passed


# ----------------------------------------------------------------------------- merge_and_unload
def test_merge_and_unload_returns_the_plain_architecture_and_never_touches_the_model(adapted_toy):
    model, adapted = adapted_toy
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        reference = adapted(x)
    for fused_first in (False, True):
        if fused_first:
            fuse_lora(adapted, lora_scale=0.25)  # merge_and_unload keeps a fused layer's own scale
            with torch.no_grad():
                reference = adapted(x)
        before = fingerprint(adapted)
        plain = merge_and_unload(adapted)
        assert_unchanged(adapted, before)
        assert not lora_layers(plain) and not any(isinstance(m, lora.LoRALayer) for m in plain.modules())
        assert [(n, type(m)) for n, m in plain.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]
        assert plain.state_dict().keys() == model.state_dict().keys()
        assert [p.requires_grad for p in plain.parameters()] == [p.requires_grad for p in model.parameters()]
        with torch.no_grad():
            result = compare_outputs(reference, plain(x), rtol=RTOL, name="merged plain model")
        assert result.passed, str(result)
    in_place = merge_and_unload(adapted, inplace=True)
    assert in_place is adapted and not lora_layers(adapted)


def test_merge_and_unload_with_lora_scale_and_of_a_bare_layer():
    layer = randomize_adapters(LoRALinear(nn.Linear(6, 4), r=2, alpha=2))
    plain = merge_and_unload(layer, lora_scale=0.5)
    assert type(plain) is nn.Linear and plain.weight.requires_grad
    exact = layer.base.weight.double() + 0.5 * layer.delta_weight()
    assert torch.equal(plain.weight, exact.float())
    assert not layer.merged and layer.base.weight.data_ptr() != plain.weight.data_ptr()


# ----------------------------------------------------------------------------- inject_lora
def test_inject_lora_by_name_and_by_type_in_module_order():
    model = toy_model()
    by_type = inject_lora(model, [nn.Linear, "0"], r=2, alpha=2)
    assert list(lora_layers(by_type)) == ["0", "9"]
    assert isinstance(by_type[0], LoRAConv2d) and isinstance(by_type[9], LoRALinear)
    assert "0.base.weight" in by_type.state_dict() and "0.lora_A" in by_type.state_dict()
    single = inject_lora(model, "5", r=1, alpha=1)
    assert list(lora_layers(single)) == ["5"]
    same = inject_lora(model, ["9"], r=2, alpha=2, inplace=True)
    assert same is model and isinstance(model[9], LoRALinear)
    more = inject_lora(model, ["0"], r=2, alpha=2)  # a second adapter, on another layer
    assert list(lora_layers(more)) == ["0", "9"]


INJECT_BAD_INPUTS = {
    # name: (kwargs for inject_lora on the toy model, exception, message pattern)
    "rank_zero": (dict(target_modules=["9"], r=0, alpha=1), ValueError, r"positive int, got 0"),
    "alpha_negative": (dict(target_modules=["9"], r=2, alpha=-1), ValueError, r"alpha must be .* got -1"),
    "dropout_negative": (dict(target_modules=["9"], r=2, alpha=1, dropout=-0.1), ValueError, r"got -0.1"),
    "unknown_name": (dict(target_modules=["0", "layer9.conv"], r=2, alpha=1), KeyError,
                     r"target module 'layer9.conv' does not exist in Sequential"),
    "misspelled_name": (dict(target_modules=["fc"], r=2, alpha=1), KeyError, r"'fc' does not exist"),
    "unsupported_type": (dict(target_modules=[nn.BatchNorm2d], r=2, alpha=1), TypeError,
                         r"target type BatchNorm2d is not supported: LoRA adapters fit Linear, Conv2d"),
    "unmatched_type_conv1d": (dict(target_modules=[nn.Conv1d], r=2, alpha=1), TypeError, r"Conv1d is not supported"),
    "unsupported_named_module": (dict(target_modules=["9", "1"], r=2, alpha=1), TypeError,
                                 r"cannot put a LoRA adapter on '1' \(BatchNorm2d\)"),
    "depthwise_by_name": (dict(target_modules=["0", "3"], r=2, alpha=1), ValueError,
                          r"cannot put a LoRA adapter on '3': .*depthwise conv with groups=8"),
    "depthwise_by_type": (dict(target_modules=[nn.Conv2d], r=2, alpha=1), ValueError,
                          r"cannot put a LoRA adapter on '3'"),
    "empty": (dict(target_modules=[], r=2, alpha=1), ValueError, r"target_modules is empty"),
    "root_name": (dict(target_modules=[""], r=2, alpha=1), KeyError, r"target module '' does not exist"),
    "not_a_name": (dict(target_modules=[3], r=2, alpha=1), TypeError, r"dotted names \(str\) or module types, got 3"),
}


@pytest.mark.parametrize("case", list(INJECT_BAD_INPUTS))
def test_inject_lora_bad_input_is_rejected_and_nothing_is_half_applied(case):
    kwargs, error, pattern = INJECT_BAD_INPUTS[case]
    model = toy_model()
    before = fingerprint(model)
    for inplace in (False, True):
        with pytest.raises(error, match=pattern):
            inject_lora(model, inplace=inplace, **kwargs)
        assert_unchanged(model, before)


def test_inject_lora_twice_on_a_layer_is_refused():
    adapted = inject_lora(toy_model(), ["9"], r=2, alpha=2)
    before = fingerprint(adapted)
    for target in ("9", "9.base"):
        with pytest.raises(ValueError, match=rf"'{target}' already has a LoRA adapter"):
            inject_lora(adapted, [target], r=2, alpha=2, inplace=True)
    with pytest.raises(ValueError, match=r"Linear matches no module"):  # '9.base' is inside the adapter
        inject_lora(adapted, [nn.Linear], r=2, alpha=2)
    assert_unchanged(adapted, before)


def test_lora_state_dict_trainable_flags_and_counts(adapted_toy):
    _, adapted = adapted_toy
    assert set(lora.lora_state_dict(adapted)) == {f"{n}.lora_{w}" for n in ("0", "5", "9") for w in "AB"}
    lora.mark_only_lora_as_trainable(adapted)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{w}" for n in ("0", "5", "9") for w in "AB"}
    adapter, adapted_weights = lora.count_lora_parameters(adapted)
    assert adapter == 2 * (3 * 9 + 8) + 2 * (8 + 16) + 2 * (16 + 10)
    assert adapted_weights == 8 * 3 * 9 + 16 * 8 + 10 * 16


# ----------------------------------------------------------------------------- fine-tuning and the cache
def test_fine_tune_lora_changes_only_the_adapters():
    model = inject_lora(toy_model(), ["0", "5", "9"], r=2, alpha=4)
    base_state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora_before = lora.lora_state_dict(model)
    torch.manual_seed(8)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))
    history = lora.fine_tune_lora(model, x, y, epochs=3, lr=1e-2, batch_size=16)
    assert [row["epoch"] for row in history] == [1, 2, 3] and history[-1]["train_loss"] < history[0]["train_loss"]
    state = model.state_dict()
    for key, value in base_state.items():  # weights and BatchNorm running statistics alike
        assert torch.equal(state[key], value), key
    assert all(not torch.equal(lora.lora_state_dict(model)[k], v) for k, v in lora_before.items() if k.endswith("B"))
    assert not model.training


def test_shifted_digits_are_the_digits_shifted_and_normalized_like_the_original():
    x_train, _, x_test, y_test = data.digits_tensors(image_size=8, normalize=False)
    mean, std = float(x_train.mean()), float(x_train.std())
    inv_train, _, inv_test, inv_y = lora.shifted_digits_tensors("invert", image_size=8)
    torch.testing.assert_close(inv_test * std + mean, 1 - x_test, rtol=0, atol=1e-5)
    assert torch.equal(inv_y, y_test)
    rot_test = lora.shifted_digits_tensors("rotate", image_size=8)[2]
    torch.testing.assert_close(rot_test * std + mean, torch.rot90(x_test, 1, dims=(2, 3)), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"unknown shift 'flip'; choose one of \['invert', 'rotate'\]"):
        lora.shifted_digits_tensors("flip")


def test_lora_runs_are_cached_by_their_parameters(tmp_path, monkeypatch):
    real = zoo.trained_model

    def toy_base(name, technique="plain", **kw):
        """The plain run is a toy model; the LoRA run is the real recipe."""
        return real(name, technique, **kw) if technique != "plain" else (toy_model(), {"key": "toy", "test_accuracy": 0.5})

    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "trained_model", toy_base)
    kwargs = dict(name="toy", r=2, alpha=4, epochs=1, image_size=8, progress=False)
    first, metrics = zoo.trained_model(technique="lora", **kwargs)
    assert not metrics["cached"] and list(lora_layers(first)) == ["0", "5", "9"]
    assert [p.name for p in tmp_path.iterdir()] == [f"lora-toy-{metrics['key']}.pt"]
    again, metrics_again = zoo.trained_model(technique="lora", **kwargs)
    assert metrics_again["cached"] and metrics_again["test_accuracy"] == metrics["test_accuracy"]
    for key, value in lora.lora_state_dict(first).items():
        assert torch.equal(lora.lora_state_dict(again)[key], value)
    other = zoo.trained_model(technique="lora", **dict(kwargs, r=3))[1]
    assert other["key"] != metrics["key"] and not other["cached"]


# ----------------------------------------------------------------------------- course models
@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def lora_models(request):
    """(name, plain model, adapted (unfused), adapted and fused, merged plain model)."""
    name = request.param
    torch.manual_seed(0)
    plain = randomize_batchnorm(models.build(name), seed=0).eval()
    before = fingerprint(plain)
    adapted = randomize_adapters(inject_lora(plain, dense_layer_names(plain), r=4, alpha=8), seed=1).eval()
    fused = fuse_lora(copy.deepcopy(adapted))
    merged = merge_and_unload(adapted)
    assert_unchanged(plain, before)
    return name, plain, adapted, fused, merged


def test_course_models_get_adapters_on_their_dense_layers(lora_models):
    name, plain, adapted, fused, merged = lora_models
    convs = {n: m for n, m in plain.named_modules() if isinstance(m, nn.Conv2d)}
    wrapped = lora_layers(adapted)
    if name == "resnet18":
        assert set(wrapped) == set(convs) | {"fc"} and len(wrapped) == 21
    else:  # MobileNetV2: the stem, every pointwise conv and the classifier; never a depthwise conv
        pointwise = {n for n, m in convs.items() if m.kernel_size == (1, 1)}
        assert pointwise <= set(wrapped) and "classifier.1" in wrapped and "features.0.0" in wrapped
        assert not any(convs[n].groups > 1 for n in wrapped if n in convs)
        assert len(wrapped) == len(pointwise) + 2
        with pytest.raises(ValueError, match=r"cannot put a LoRA adapter on 'features\.1\.conv\.0\.0'.*depthwise"):
            inject_lora(plain, [nn.Conv2d], r=4, alpha=8)


@pytest.mark.parametrize("inputs", ["digits_batch", "photo_batch"])
def test_fused_and_merged_course_models_equal_the_adapted_model(lora_models, inputs, request):
    name, plain, adapted, fused, merged = lora_models
    x = request.getfixturevalue(inputs)
    with torch.inference_mode():
        reference = adapted(x)
        base_out = plain(x)
        results = [compare_outputs(reference, candidate(x), rtol=RTOL, name=f"{name} {label} {inputs}")
                   for label, candidate in (("fused", fused), ("merged plain", merged))]
    assert compare_outputs(base_out, reference, rtol=1e-3).max_rel > 1e-3  # the adapters change the outputs
    for result in results:
        print(result)
        assert result.passed, str(result)
    assert [type(m) for m in merged.modules()] == [type(m) for m in plain.modules()]


def test_unfused_course_model_gets_its_original_weights_back(lora_models):
    name, plain, adapted, fused, merged = lora_models
    model = copy.deepcopy(fused)
    unfuse_lora(model)
    for key, value in adapted.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    base_keys = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    for key, value in plain.state_dict().items():
        assert torch.equal(base_keys[key], value), key


# ----------------------------------------------------------------------------- edges: aliases, scales, state, hooks
def aliased_model() -> nn.Sequential:
    """``'0'`` and ``'2'`` are one Linear: the model applies it twice."""
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    return nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(6, 3)).eval()


@pytest.mark.parametrize("target", ["0", "2", nn.Linear, ["3", "2"]])
def test_a_layer_used_under_two_names_is_refused_naming_both(target):
    model = aliased_model()
    before = fingerprint(model)
    for inplace in (False, True):
        with pytest.raises(ValueError, match=r"'0' is one module under several names \('0', '2'\)"):
            inject_lora(model, target, r=2, alpha=2, inplace=inplace)
        assert_unchanged(model, before)
    assert list(lora_layers(inject_lora(model, "3", r=2, alpha=2))) == ["3"]


def test_merge_and_unload_keeps_each_fused_layers_own_scale(adapted_toy):
    _, adapted = adapted_toy
    x = torch.randn(2, 3, 8, 8)
    fuse_lora(adapted, lora_scale=0.5)
    lora_layers(adapted)["9"].merge(0.25)
    with torch.no_grad():
        reference = adapted(x)
        kept = merge_and_unload(adapted)
        assert torch.equal(kept(x), reference)
        assert torch.equal(kept[9].weight, adapted[9].base.weight)
        rescaled = merge_and_unload(adapted, lora_scale=1.0)  # a scale given: every layer takes it
        assert torch.equal(rescaled(x), fuse_lora(copy.deepcopy(adapted), 1.0)(x))
        assert not torch.equal(rescaled(x), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_state_dict_round_trip_comes_back_fused_and_unfuses_exactly(dtype):
    torch.manual_seed(0)
    plain = randomize_batchnorm(models.build("resnet18"), seed=0).eval().to(dtype)
    adapted = randomize_adapters(inject_lora(plain, dense_layer_names(plain), r=2, alpha=4), seed=3)
    x = data.digits_tensors()[2][:2].to(dtype)
    fused = fuse_lora(copy.deepcopy(adapted), lora_scale=0.5)
    with torch.no_grad():
        expected_fused, expected_unfused = fused(x), adapted(x)
    state = copy.deepcopy(fused.state_dict())

    fresh = inject_lora(plain, dense_layer_names(plain), r=2, alpha=4)  # unfused, other adapters
    fresh.load_state_dict(state)
    assert all(layer.merged and layer.lora_scale == 0.5 for layer in lora_layers(fresh).values())
    with torch.no_grad():
        assert torch.equal(fresh(x), expected_fused)
        unfuse_lora(fresh)
        assert torch.equal(fresh(x), expected_unfused)  # not the update applied twice
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in adapted.state_dict().items())

    fresh_fused = fuse_lora(copy.deepcopy(fresh), lora_scale=2.0)  # an unfused state into a fused model
    fresh_fused.load_state_dict(adapted.state_dict())
    assert not any(layer.merged for layer in lora_layers(fresh_fused).values())
    with torch.no_grad():
        assert torch.equal(fresh_fused(x), expected_unfused)
        assert torch.equal(unfuse_lora(fresh_fused)(x), expected_unfused)  # the loaded base weight is kept


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(1), 1, 0.5])
def test_scale_and_alpha_take_any_real_number(value):
    layer = randomize_adapters(LoRALinear(nn.Linear(4, 3), r=2, alpha=value))
    assert layer.alpha == float(value) and type(layer.alpha) is float
    exact = layer.base.weight.double() + float(value) * layer.delta_weight()
    layer.merge(value)
    assert layer.lora_scale == float(value) and torch.equal(layer.base.weight, exact.float())
    assert torch.equal(merge_and_unload(layer, value).weight, layer.base.weight)


@pytest.mark.parametrize("value", [True, torch.tensor([0.5]), torch.tensor(True), "0.5", np.float32("nan"), 1j])
def test_scale_and_alpha_refuse_what_is_not_a_real_number(value):
    with pytest.raises(ValueError, match=r"alpha must be a positive finite number"):
        LoRALinear(nn.Linear(4, 3), r=2, alpha=value)
    with pytest.raises(ValueError, match=r"lora_scale must be a finite number"):
        fuse_lora(inject_lora(nn.Sequential(nn.Linear(4, 3)), "0", r=2, alpha=2), value)


def test_inject_lora_on_the_root_module():
    linear = nn.Linear(3, 3)
    for inplace in (False, True):
        layer = inject_lora(linear, nn.Linear, r=2, alpha=2, inplace=inplace)
        assert type(layer) is LoRALinear and (layer.base is linear) is inplace
        assert type(merge_and_unload(layer)) is nn.Linear


def test_forward_hooks_follow_the_layers_name_through_inject_and_merge():
    model = toy_model()
    seen, pre = [], []
    handle = model[9].register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    model[9].register_forward_pre_hook(lambda m, args, kwargs: pre.append(type(m).__name__), with_kwargs=True)
    x = torch.randn(2, 3, 8, 8)
    adapted = randomize_adapters(inject_lora(model, ["9"], r=2, alpha=2, inplace=True))
    with torch.no_grad():
        out = adapted(x)
    assert len(seen) == 1 and torch.equal(seen[0], out)  # once, the adapted output
    assert pre == ["LoRALinear"]
    plain = merge_and_unload(adapted)
    with torch.no_grad():
        plain_out = plain(x)
    assert len(seen) == 2 and torch.equal(seen[1], plain_out) and pre[-1] == "Linear"
    handle.remove()  # the caller's handle still removes it from the wrapper
    with torch.no_grad():
        adapted(x)
    assert len(seen) == 2
