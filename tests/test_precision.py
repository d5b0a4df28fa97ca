"""fusionlib.precision: the float formats' numbers, casting helpers, fold-then-cast vs cast-then-fold, fast paths."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from fusionlib import data, fx, models, zoo
from fusionlib import precision as P
from fusionlib.verify import compare_outputs
from batchnorm_stats import randomize_batchnorm
from model_fingerprint import assert_unchanged, fingerprint

BF16, FP16 = torch.bfloat16, torch.float16
DEPTH = {"resnet18": 21, "mobilenet_v2": 53}  # Conv2d + Linear layers: each rounds its weights and its output


# ----------------------------------------------------------------------------- the numbers
@pytest.mark.parametrize("dtype, t, u, biggest", [
    (torch.float32, 23, 2.0 ** -24, torch.finfo(torch.float32).max),
    (FP16, 10, 2.0 ** -11, 65504.0),
    (BF16, 7, 2.0 ** -8, torch.finfo(BF16).max),
])
def test_format_numbers_match_torch_finfo(dtype, t, u, biggest):
    assert P.mantissa_bits(dtype) == t
    assert P.unit_roundoff(dtype) == u == torch.finfo(dtype).eps / 2
    assert P.max_finite(dtype) == biggest == torch.finfo(dtype).max
    assert P.float_format(dtype).bits == torch.finfo(dtype).bits


@pytest.mark.parametrize("dtype", [torch.float32, FP16, BF16])
def test_rounding_error_is_at_most_the_unit_roundoff_and_reaches_it(dtype):
    torch.manual_seed(0)
    x = torch.randn(200_000, dtype=torch.float64) * 10
    rel = ((x.to(dtype).double() - x).abs() / x.abs()).max().item()
    u = P.unit_roundoff(dtype)
    assert 0.9 * u < rel <= u


def test_fp16_overflows_past_65504_and_bf16_does_not():
    assert torch.tensor(65504.0).to(FP16).item() == 65504.0
    assert math.isinf(torch.tensor(65536.0).to(FP16).item())
    assert torch.tensor(1e30).to(BF16).isfinite().item()


@pytest.mark.parametrize("value, dtype, fields", [
    (1.0, torch.float32, ("0", "01111111", "0" * 23)),
    (-2.0, FP16, ("1", "10000", "0" * 10)),
    (65504.0, FP16, ("0", "11110", "1" * 10)),
    (1.0 + 2 ** -7, BF16, ("0", "01111111", "0000001")),
    (3.0, BF16, ("0", "10000000", "1000000")),
])
def test_bit_fields(value, dtype, fields):
    assert P.bit_fields(value, dtype) == fields


def test_dot_product_bounds():
    u = 2.0 ** -8
    assert P.dot_product_error_bound(10, BF16) == pytest.approx(10 * u / (1 - 10 * u))
    assert P.dot_product_error_bound(256, BF16) == math.inf
    assert P.dot_product_typical_error(64, BF16) == pytest.approx(8 * u)
    assert P.worst_case_relative_error(20, BF16) == pytest.approx((1 + u) ** 20 - 1)
    assert P.typical_relative_error(16, FP16) == pytest.approx(4 * 2.0 ** -11)


@pytest.mark.parametrize("k", [16, 64, 200])
def test_a_dot_product_summed_in_bf16_stays_within_gamma_k(k):
    torch.manual_seed(k)
    x, y = torch.rand(k, dtype=torch.float64), torch.rand(k, dtype=torch.float64)
    xb, yb = x.to(BF16), y.to(BF16)
    exact = float(xb.double() @ yb.double())            # the bf16 inputs, summed exactly
    acc = torch.zeros((), dtype=BF16)
    for a, b in zip(xb, yb):
        acc = (acc + a * b).to(BF16)                     # every product and partial sum rounded to bf16
    bound = P.dot_product_error_bound(k, BF16) * float((xb.double() * yb.double()).abs().sum())
    assert abs(float(acc) - exact) <= bound
    fp32_acc = float((xb.float() * yb.float()).sum())   # fp32 accumulation: far below the bf16 bound
    assert abs(fp32_acc - exact) <= P.dot_product_error_bound(k, torch.float32) * exact


def test_round_to_nearest_fixes_torchs_double_rounding():
    x = torch.tensor([1 + 2 ** -8 + 2 ** -30, -(1 + 2 ** -8 + 2 ** -30), 3.0], dtype=torch.float64)
    assert x.to(BF16).tolist() == [1.0, -1.0, 3.0]          # via float32: lands on the midpoint, then rounds down
    assert P.round_to_nearest(x, BF16).tolist() == [1 + 2 ** -7, -(1 + 2 ** -7), 3.0]
    torch.manual_seed(0)
    y = torch.randn(100_000, dtype=torch.float64)
    r = P.round_to_nearest(y, FP16)
    for direction in (math.inf, -math.inf):
        neighbour = torch.nextafter(r, torch.full_like(r, direction))
        assert ((r.double() - y).abs() <= (neighbour.double() - y).abs()).all()


@pytest.mark.parametrize("call, pattern", [
    (lambda: P.unit_roundoff(torch.int8), r"dtype must be one of .* got torch.int8"),
    (lambda: P.dot_product_error_bound(0, BF16), r"k must be a positive int, got 0"),
    (lambda: P.worst_case_relative_error(2.5, BF16), r"depth must be a positive int, got 2.5"),
    (lambda: P.bit_fields(1.0, torch.float64), r"got torch.float64"),
])
def test_numerics_reject_bad_input(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# ----------------------------------------------------------------------------- casting
@pytest.fixture(scope="module")
def digits():
    return data.digits_tensors()[2][:32]


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def trained(request):
    model, _ = zoo.trained_model(request.param, epochs=3, image_size=32, seed=0, progress=False)
    return request.param, model.eval()


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cast_model_casts_a_copy_and_keeps_float32_io(dtype, channels_last):
    torch.manual_seed(0)
    model = randomize_batchnorm(models.build("resnet18")).eval()
    before = fingerprint(model)
    x = data.digits_tensors()[2][:4]
    cast = P.cast_model(model, dtype, channels_last)
    assert_unchanged(model, before)
    assert all(t.dtype == dtype for t in [*cast.parameters(), *cast.buffers()] if t.is_floating_point())
    conv = cast.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
    with torch.inference_mode():
        out, ref = cast(x), model(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert compare_outputs(ref, out, rtol=P.worst_case_relative_error(DEPTH["resnet18"], dtype)).passed
    assert [n for n, _ in cast.named_modules()] == [n for n, _ in model.named_modules()]  # names kept


def test_cast_model_without_io_cast_takes_the_dtype_and_inplace_casts_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    cast = P.cast_model(model, BF16, cast_io=False)
    with torch.inference_mode():
        assert cast(torch.randn(1, 3, 5, 5, dtype=BF16)).dtype == BF16
    same = P.cast_model(model, BF16, inplace=True)
    assert same is model and model[1].running_var.dtype == BF16


class _KeywordInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor, *, shift: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x if shift is None else x + shift)


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_cast_model_casts_keyword_inputs_too(dtype):
    torch.manual_seed(0)
    model = _KeywordInput().eval()
    x, shift = torch.randn(1, 3, 6, 6), torch.randn(1, 3, 1, 1)
    cast = P.cast_model(model, dtype, channels_last=True)
    wrapped = P.autocast_model(model, dtype, channels_last=True)
    with torch.inference_mode():
        ref = model(x, shift=shift)
        for out in (cast(x=x, shift=shift), cast(x, shift=shift), wrapped(x=x, shift=shift)):
            assert out.dtype == torch.float32
            assert compare_outputs(ref, out, rtol=4 * P.unit_roundoff(dtype)).passed


@pytest.mark.parametrize("args, error, pattern", [
    ((nn.Linear(2, 2), torch.int8), ValueError, r"dtype must be torch.bfloat16, .* got torch.int8"),
    ((nn.Linear(2, 2), "bf16"), ValueError, r"got 'bf16'"),
    (("not a model", BF16), TypeError, r"model must be an nn.Module, got str"),
])
def test_cast_model_rejects_bad_input_and_changes_nothing(args, error, pattern):
    model = args[0]
    before = fingerprint(model) if isinstance(model, nn.Module) else None
    with pytest.raises(error, match=pattern):
        P.cast_model(*args, inplace=True)
    if before is not None:
        assert_unchanged(model, before)


def test_autocast_runs_convolutions_in_bf16_and_the_model_returns_float32(digits):
    torch.manual_seed(0)
    model = randomize_batchnorm(models.build("mobilenet_v2")).eval()
    conv = nn.Conv2d(3, 4, 3)
    with torch.inference_mode(), P.autocast(BF16):
        assert conv(torch.randn(1, 3, 5, 5)).dtype == BF16
    wrapped = P.autocast_model(model, BF16, channels_last=True)
    with torch.inference_mode():
        out, ref = wrapped(digits), model(digits)
    assert out.dtype == torch.float32
    assert compare_outputs(ref, out, rtol=P.worst_case_relative_error(DEPTH["mobilenet_v2"], BF16)).passed
    with pytest.raises(ValueError, match=r"autocast dtype must be torch.bfloat16 or torch.float16"):
        P.autocast(torch.float32)


# ----------------------------------------------------------------------------- fold-then-cast vs cast-then-fold
def _exact_fold(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in fx.fuse_conv_bn(copy.deepcopy(model).double()).state_dict().items()
            if k.endswith(("weight", "bias"))}


def test_fold_then_cast_rounds_each_folded_weight_once_to_the_nearest_bf16(trained):
    name, model = trained
    before = fingerprint(model)
    exact = _exact_fold(model)
    ftc = P.fold_then_cast(model, BF16).state_dict()
    ctf = P.cast_then_fold(model, BF16).state_dict()
    assert_unchanged(model, before)
    worse = 0
    for key, value in exact.items():
        assert ftc[key].dtype == ctf[key].dtype == BF16, key
        assert torch.equal(ftc[key], P.round_to_nearest(value, BF16)), key   # one rounding of the exact fold
        err_ftc, err_ctf = (ftc[key].double() - value).abs(), (ctf[key].double() - value).abs()
        assert (err_ftc <= err_ctf).all(), key                     # never farther from it than cast-then-fold
        worse += int((err_ctf > err_ftc).sum())
    assert worse > 0  # and cast-then-fold does round some weights differently


def test_fold_then_cast_is_at_least_as_accurate_as_cast_then_fold_on_the_outputs(trained):
    # The whole digits test split (360 images): on a few images the two orders' worst elements can swap.
    name, model = trained
    x = data.digits_tensors()[2]
    with torch.inference_mode():
        reference = copy.deepcopy(model).double()(x.double())
        max_rel, norm_rel = {}, {}
        for label, fn in [("fold_then_cast", P.fold_then_cast), ("cast_then_fold", P.cast_then_fold)]:
            candidate = fn(model, BF16)
            assert fx.count_batchnorm_nodes(candidate) == 0        # every BatchNorm folded
            out = candidate(x)
            assert out.dtype == torch.float32
            max_rel[label] = compare_outputs(reference, out.double()).max_rel
            norm_rel[label] = float((out.double() - reference).norm() / reference.norm())
    tol = P.worst_case_relative_error(DEPTH[name], BF16)
    assert 0 < max_rel["fold_then_cast"] <= max_rel["cast_then_fold"] <= tol, max_rel
    assert norm_rel["fold_then_cast"] < norm_rel["cast_then_fold"], norm_rel


def test_fold_then_cast_keeps_channels_last(trained, digits):
    name, model = trained
    candidate = P.fold_then_cast(model, BF16, channels_last=True)
    assert candidate.get_submodule("conv1" if name == "resnet18" else "features.0.0").weight.is_contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode():
        assert compare_outputs(model(digits), candidate(digits),
                               rtol=P.worst_case_relative_error(DEPTH[name], BF16)).passed


# ----------------------------------------------------------------------------- fast paths
@pytest.mark.parametrize("dtype, flags, path", [
    (BF16, {"amx_bf16", "amx_tile", "avx512_bf16"}, "AMX"),
    (BF16, {"avx512_bf16", "avx512f"}, "AVX512-BF16"),
    (BF16, {"avx2"}, "none"),
    (FP16, {"avx512_bf16", "avx512f"}, "none"),
    (FP16, {"amx_fp16"}, "AMX"),
    (FP16, {"avx512_fp16"}, "AVX512-FP16"),
    (torch.float32, {"avx2"}, "fp32"),
])
def test_fast_path_from_cpu_flags(dtype, flags, path):
    found = P.fast_path(dtype, flags=flags)
    assert found.path == path and found.fast == (path != "none")
    assert found.capability == str(torch.backends.cpu.get_cpu_capability())
    assert ("no fast path" in found.describe()) == (path == "none")


def test_fast_path_on_this_machine_never_raises():
    for dtype in (BF16, FP16, torch.float32):
        assert P.fast_path(dtype).path in {"AMX", "AVX512-BF16", "AVX512-FP16", "oneDNN", "fp32", "none"}


def test_check_fast_path_warns_with_the_measured_slowdown_where_there_is_none():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.warns(P.SlowPrecisionWarning, match=r"no fast path .* measured \d+\.\d\dx the fp32 time"):
        path, ratio = P.check_fast_path(model, x, BF16, repeats=1, flags={"avx2"})
    assert path.path == "none" and ratio > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fast path: no warning, nothing measured
        assert P.check_fast_path(model, x, BF16, flags={"amx_bf16"})[1] is None


def test_check_fast_path_measures_in_eval_mode_and_leaves_a_training_model_as_it_was():
    torch.manual_seed(0)
    model = models.build("mobilenet_v2", num_classes=10, small_input=True, dropout=0.5).train()
    dropout_modes = []
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.register_forward_hook(lambda mod, args, out: dropout_modes.append(mod.training))
    before = fingerprint(model)
    with pytest.warns(P.SlowPrecisionWarning):
        P.check_fast_path(model, torch.randn(2, 3, 16, 16), BF16, repeats=1, flags={"avx2"})
    assert_unchanged(model, before)  # num_batches_tracked and running statistics too
    assert all(m.training for m in model.modules())
    assert dropout_modes and not any(dropout_modes)


def test_check_fast_path_never_raises_when_the_measurement_fails():
    model = nn.Linear(4, 2).eval()
    torch.set_num_threads(2)  # the measurement runs on one thread; the caller's count must come back
    with pytest.warns(P.SlowPrecisionWarning, match=r"the measurement failed \(RuntimeError"):
        path, ratio = P.check_fast_path(model, torch.randn(1, 3), FP16, repeats=1, flags=set(["avx2"]))
    assert ratio is None and torch.get_num_threads() == 2


# ----------------------------------------------------------------------------- variants
@pytest.mark.parametrize("spec, dtype, folded, channels_last", [
    ("fp32", torch.float32, False, False), ("fp32+fold+cl", torch.float32, True, True),
    ("autocast_bf16+cl", torch.float32, False, True), ("autocast_fp16+fold", torch.float32, True, False),
    ("bf16", BF16, False, False), ("bf16+cl+fold", BF16, True, True), ("fp16+fold", FP16, True, False),
])
def test_variant_builds_what_the_spec_says(spec, dtype, folded, channels_last, digits):
    torch.manual_seed(0)
    model = randomize_batchnorm(models.build("resnet18")).eval()
    before = fingerprint(model)
    built = P.variant(model, spec)
    assert_unchanged(model, before)
    weight = next(m for m in built.modules() if isinstance(m, nn.Conv2d)).weight
    assert weight.dtype == dtype and weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    graph = built if isinstance(built, torch.fx.GraphModule) else getattr(built, "module", built)
    if folded:
        assert isinstance(graph, torch.fx.GraphModule) and fx.count_batchnorm_nodes(graph) == 0
    else:
        assert any(isinstance(m, nn.BatchNorm2d) for m in built.modules())
    with torch.inference_mode():
        out = built(digits[:4])
    assert out.dtype == torch.float32
    u = P.unit_roundoff(BF16 if "bf16" in spec else FP16 if "fp16" in spec else torch.float32)
    tol = max(P.worst_case_relative_error(21, torch.float32), 21 * u)
    assert compare_outputs(model(digits[:4]), out, rtol=tol).passed


@pytest.mark.parametrize("spec", ["", "int8", "bf16+fast", "bf16+cl+cl", "fp32+", None])
def test_variant_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match=r"variant spec must be '<precision>\[\+fold\]\[\+cl\]'"):
        P.variant(nn.Linear(2, 2), spec)
