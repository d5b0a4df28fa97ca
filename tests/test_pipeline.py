"""fusionlib.pipeline (float_steps, relu6_clipped_share) and zoo's "pipeline" recipe (notebook 18).

Real models (rep_resnet18, rep_mobilenet_v2) with randomized BatchNorm
statistics, on 16x16 digits; the zoo tests train rep_mobilenet_v2 for one
epoch at 8x8 into a temporary FUSIONLIB_CACHE (a few seconds), never the
user's cache.
"""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from torch import nn

from fusionlib import data, models, zoo
from fusionlib.pipeline import EXACT_AGAINST, FLOAT_STEPS, float_steps, relu6_clipped_share
from fusionlib.reparam import RepBlock
from fusionlib.verify import compare_outputs
from batchnorm_stats import randomize_batchnorm
from model_fingerprint import assert_unchanged, fingerprint

REP_MODELS = ["rep_resnet18", "rep_mobilenet_v2"]


def rep_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(models.build(name, num_classes=10, small_input=True), seed=seed).eval()


@pytest.fixture(scope="module")
def one_thread_here():
    """conftest's one torch thread, for the module-scoped fixtures too (set up before the function-scoped one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits16(one_thread_here) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_test[:16], x_train[:32], y_train[:32])`` at 16x16."""
    x_train, y_train, x_test, _ = data.digits_tensors(image_size=16)
    return x_test[:16], x_train[:32], y_train[:32]


@pytest.fixture(scope="module")
def steps_of(digits16):
    """float_steps of each rep model, computed once (tests that edit a model compute their own)."""
    x = digits16[0]
    return {name: float_steps(rep_model(name), example_inputs=x[:2]) for name in REP_MODELS}


def outputs(steps, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: m(x) for k, m in steps.models.items()}


# ---------------------------------------------------------------------- float_steps: the steps
@pytest.mark.parametrize("name", REP_MODELS)
def test_float_steps_are_in_order_and_every_exact_pair_is_exact(name, steps_of, digits16):
    steps, x = steps_of[name], digits16[0]
    assert list(steps.models) == list(FLOAT_STEPS)
    assert steps.exact_pairs() == list(EXACT_AGAINST.items())
    assert steps.last is steps.models["equalized"]
    # each step did its job: RepBlocks deployed, then BatchNorm gone, then ReLU6 gone
    blocks = {k: [m.is_deployed for m in steps.models[k].modules() if isinstance(m, RepBlock)]
              for k in ("trained", "reparameterized")}
    assert blocks["trained"] and not any(blocks["trained"]) and all(blocks["reparameterized"])
    assert any(isinstance(m, nn.BatchNorm2d) for m in steps.models["reparameterized"].modules())
    for step in ("folded", "relu", "equalized"):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in steps.models[step].modules()), step
    for step in ("relu", "equalized"):
        assert not any(isinstance(m, nn.ReLU6) for m in steps.models[step].modules()), step
    out = outputs(steps, x)
    for step, ref in steps.exact_pairs():
        # measured: at most 4.8e-6 (rep_mobilenet_v2 equalized vs relu), about 1e-6 elsewhere
        comparison = compare_outputs(out[ref], out[step], rtol=1e-5, name=f"{step} vs {ref}")
        assert comparison.passed, comparison
    # the report lists the pairs CLE equalized (measured: 8 in rep_resnet18, 36 in rep_mobilenet_v2)
    assert steps.report is not None and len(steps.report.pairs) >= 8
    assert steps.report.iterations >= 1
    assert steps.relu6_replaced == list(steps.report.relu6_replaced)
    relu6_names = [n for n, m in steps.models["folded"].named_modules() if isinstance(m, nn.ReLU6)]
    assert steps.relu6_replaced == relu6_names   # [] for rep_resnet18, 35 names for rep_mobilenet_v2
    assert (len(relu6_names) == 35) == (name == "rep_mobilenet_v2")


def test_relu_step_differs_from_folded_where_relu6_clips(steps_of, digits16):
    x = digits16[0]
    steps = steps_of["rep_mobilenet_v2"]
    share, per_layer = relu6_clipped_share(steps.models["folded"], x)
    assert share > 0 and max(per_layer.values()) > 0   # measured: 1.5% of ReLU6 inputs above 6
    out = outputs(steps, x)
    # measured max rel 0.93: far from float rounding (the exact pairs are at most 4.8e-6)
    assert compare_outputs(out["folded"], out["relu"]).max_rel > 1e-5


def test_relu_step_is_the_folded_model_without_relu6(steps_of, digits16):
    x = digits16[0]
    steps = steps_of["rep_resnet18"]
    assert relu6_clipped_share(steps.models["folded"], x) == (0.0, {})
    out = outputs(steps, x)
    assert torch.equal(out["relu"], out["folded"])


@pytest.mark.parametrize("name", REP_MODELS)
def test_without_equalize_the_steps_stop_at_folded(name, digits16):
    model = rep_model(name)
    steps = float_steps(model, equalize=False)
    assert list(steps.models) == list(FLOAT_STEPS[:3])
    assert steps.last is steps.models["folded"]
    assert steps.report is None and steps.relu6_replaced == []
    assert steps.exact_pairs() == [("reparameterized", "trained"), ("folded", "reparameterized")]
    x = digits16[0]
    with torch.no_grad():  # measured max rel 1.2e-6 (rep_resnet18)
        assert compare_outputs(model(x), steps.last(x), rtol=1e-5).passed


# ---------------------------------------------------------------------- float_steps: the caller's model, copies
@pytest.mark.parametrize("recalibrate", [False, True])
def test_the_callers_model_is_never_touched(recalibrate, digits16):
    x, x_train, y_train = digits16
    model = rep_model("rep_mobilenet_v2")
    before = fingerprint(model)
    batches = [(x_train[:16], y_train[:16]), (x_train[16:], y_train[16:])] if recalibrate else None
    steps = float_steps(model, batches, x[:2])
    assert_unchanged(model, before)
    again = float_steps(model, batches, x[:2])   # the second call: the same steps, bit for bit
    for step, m in steps.models.items():
        for (k, v), (k2, v2) in zip(m.state_dict().items(), again.models[step].state_dict().items()):
            assert k == k2 and torch.equal(v, v2), (step, k)
    bn = "features.0.1"   # the stem's BatchNorm: recalibrated only when batches are given
    stored = model.get_submodule(bn).running_mean
    trained = steps.models["trained"].get_submodule(bn).running_mean
    assert torch.equal(stored, trained) != recalibrate


def _storages(model: nn.Module) -> set[int]:
    tensors = list(model.parameters()) + list(model.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


@pytest.mark.parametrize("name", REP_MODELS)
def test_steps_share_no_tensors_and_editing_one_leaves_the_others(name, digits16):
    x = digits16[0]
    model = rep_model(name)
    steps = float_steps(model)
    storages = {k: _storages(m) for k, m in steps.models.items()}
    storages["caller"] = _storages(model)
    for a in storages:
        for b in storages:
            if a < b:
                assert not storages[a] & storages[b], f"{a} and {b} share tensors"
    before = outputs(steps, x)
    edited = "folded"
    with torch.no_grad():
        for p in steps.models[edited].parameters():
            p.mul_(0.5)
    after = outputs(steps, x)
    assert not torch.equal(after[edited], before[edited])
    for k in steps.models:
        if k != edited:
            assert torch.equal(after[k], before[k]), k


# ---------------------------------------------------------------------- float_steps: edges
class SharedNet(nn.Module):
    """A RepBlock under two names (``block``, ``again``) and one ReLU6 (``act``) called three times."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.block = RepBlock(8, 8, 3)
        self.again = self.block
        self.act = nn.ReLU6()
        self.conv, self.bn = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act(self.block(self.stem(x)))
        x = self.act(self.again(x))
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


def test_shared_modules_stay_exact_and_relu_differs_only_when_relu6_clips():
    torch.manual_seed(0)
    model = randomize_batchnorm(SharedNet()).eval()
    before = fingerprint(model)
    steps = float_steps(model)
    assert_unchanged(model, before)
    skipped = {k.layer: k.reason for k in steps.report.skipped}
    assert "called at 2 places" in skipped["block.deployed"]   # CLE leaves the shared conv alone
    big, small = torch.randn(4, 3, 8, 8) * 3, torch.randn(4, 3, 8, 8) * 0.1
    with torch.no_grad():
        out = outputs(steps, big)
        assert torch.equal(out["trained"], copy.deepcopy(model)(big))
    for step, ref in steps.exact_pairs():
        # measured: at most 1.8e-7
        assert compare_outputs(out[ref], out[step], rtol=1e-5).passed, (step, ref)
    # measured: 1.9% of ReLU6 inputs above 6 -> max rel 0.35; none above 6 at 0.1x -> bit-identical
    assert relu6_clipped_share(model, big)[0] > 0
    assert compare_outputs(out["folded"], out["relu"]).max_rel > 1e-5
    assert relu6_clipped_share(model, small) == (0.0, {"stem.2": 0.0, "act": 0.0})
    small_out = outputs(steps, small)
    assert torch.equal(small_out["folded"], small_out["relu"])


def test_a_model_in_training_mode_is_an_error_naming_the_module():
    model = rep_model("rep_resnet18")
    model.get_submodule("layer2.0.bn1").train()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"eval.*'layer2\.0\.bn1'|'layer2\.0\.bn1'.*eval"):
        float_steps(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [-1, True, False, 2.0, 1.5, "3", None])
def test_cle_iterations_must_be_a_non_negative_int(bad):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6()).eval()
    with pytest.raises(ValueError, match=re.escape(f"cle_iterations must be an int >= 0, got {bad!r}")):
        float_steps(model, cle_iterations=bad)


def test_cle_iterations_zero_folds_and_swaps_only(digits16):
    steps = float_steps(rep_model("rep_mobilenet_v2"), cle_iterations=0)
    assert steps.report.iterations == 0
    x = digits16[0]
    out = outputs(steps, x)
    assert torch.equal(out["equalized"], out["relu"])


@pytest.mark.parametrize("bad", [{"weight": torch.zeros(1)}, torch.zeros(2, 3), lambda x: x])
def test_not_a_module_is_a_type_error(bad):
    with pytest.raises(TypeError, match=f"nn.Module, got {type(bad).__name__}"):
        float_steps(bad)


@pytest.fixture(scope="module")
def half_errors(digits16):
    """``errors(dtype)`` -> ``({step: its exact pair's max rel error}, the trained model's own error in dtype)``."""
    x, memo = digits16[0], {}

    def errors(dtype: torch.dtype) -> tuple[dict[str, float], float]:
        if dtype not in memo:
            model = rep_model("rep_mobilenet_v2")
            steps = float_steps(copy.deepcopy(model).to(dtype))
            for step, m in steps.models.items():
                assert all(p.dtype == dtype for p in m.parameters()), f"{step} is not {dtype}"
            out = {k: v.double() for k, v in outputs(steps, x.to(dtype)).items()}
            pairs = {step: compare_outputs(out[ref], out[step]).max_rel for step, ref in steps.exact_pairs()}
            with torch.no_grad():
                memo[dtype] = pairs, compare_outputs(model(x).double(), out["trained"]).max_rel
        return memo[dtype]

    return errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_keeps_its_dtype_and_reparameterize_and_fold_round_once(dtype, half_errors):
    """A half model is accepted; each exact step errs no more than twice the rounding the half model itself has."""
    errors, own = half_errors(dtype)
    # measured on rep_mobilenet_v2: fp16 own 4.9e-3, reparameterized 4.3e-3, folded 3.5e-3;
    # bf16 own 2.8e-2, reparameterized 3.8e-2, folded 2.4e-2
    for step in ("reparameterized", "folded"):
        assert errors[step] <= 2 * own, (step, errors[step], own)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_equalized_step_rounds_once(dtype, half_errors):
    errors, own = half_errors(dtype)
    # before CLE ran in float32 and rounded once: fp16 own 4.9e-3, equalized 2.0e-2; bf16 own 2.8e-2, equalized 1.2e-1
    assert errors["equalized"] <= 2 * own, (errors["equalized"], own)


def test_equalized_state_dict_round_trips_into_a_fresh_equalized_model(digits16):
    x = digits16[0]
    source = float_steps(rep_model("rep_mobilenet_v2", seed=0)).models["equalized"]
    fresh = float_steps(rep_model("rep_mobilenet_v2", seed=1)).models["equalized"]
    with torch.no_grad():
        expected = copy.deepcopy(source)(x)
        assert not torch.equal(fresh(x), expected)   # another seed: other weights
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


# ---------------------------------------------------------------------- relu6_clipped_share
class TwoNames(nn.Module):
    """One in-place ReLU6 under two names (``act``, ``alias``), called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.act = nn.ReLU6(inplace=True)
        self.alias = self.act

    def forward(self, x):
        return self.act(self.bn(self.conv(x))) + self.alias(x * 3)


def test_relu6_share_counts_inputs_before_an_in_place_relu6_clips_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU6(inplace=True), nn.Conv2d(3, 2, 1), nn.ReLU6(inplace=True)).eval()
    with torch.no_grad():
        model[0].weight.mul_(8)
        model[2].weight.mul_(8)
    x = torch.randn(4, 1, 5, 5)
    with torch.no_grad():   # the hand count
        z1 = model[0](x)
        z2 = model[2](z1.clamp(0, 6))
    above1, above2 = int((z1 > 6).sum()), int((z2 > 6).sum())
    assert above1 > 0 and above2 > 0   # measured: 19 of 300 and 52 of 200
    share, per_layer = relu6_clipped_share(model, x)
    assert per_layer == {"1": above1 / z1.numel(), "3": above2 / z2.numel()}
    assert share == (above1 + above2) / (z1.numel() + z2.numel())


def test_relu6_share_counts_only_inputs_strictly_above_six():
    """6 itself passes ReLU6 and ReLU alike: not clipped."""
    model = nn.Sequential(nn.ReLU6(inplace=True))
    assert relu6_clipped_share(model, torch.tensor([[5.0, 6.0, 6.5, -1.0]])) == (0.25, {"0": 0.25})


def test_relu6_share_counts_every_call_of_a_module_under_two_names():
    torch.manual_seed(0)
    model = TwoNames().eval()
    x = torch.randn(2, 1, 4, 4) * 4
    with torch.no_grad():   # the hand count
        z1, z2 = model.bn(model.conv(x)), x * 3
    above = int((z1 > 6).sum()) + int((z2 > 6).sum())
    assert above > 0
    share, per_layer = relu6_clipped_share(model, x)
    assert share == above / (z1.numel() + z2.numel())
    assert per_layer == {"act": share}   # named_modules' first name; both calls counted


def test_relu6_share_restores_training_flags_and_leaves_no_hooks():
    torch.manual_seed(0)
    model = TwoNames().train()
    model.conv.eval()   # mixed flags: each must come back as it was
    before = fingerprint(model)   # BatchNorm in training mode: a forward in train mode would change its statistics
    relu6_clipped_share(model, torch.randn(2, 1, 4, 4) * 4)
    assert_unchanged(model, before)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_relu6_share_cleans_up_when_the_forward_raises():
    model = TwoNames().train()
    before = fingerprint(model)
    with pytest.raises(RuntimeError):
        relu6_clipped_share(model, torch.randn(2, 3, 4, 4))   # 3 channels into a 1-channel conv
    assert_unchanged(model, before)


def test_relu6_share_is_zero_without_relu6(digits16):
    model = rep_model("rep_resnet18")
    before = fingerprint(model)
    assert relu6_clipped_share(model, digits16[0]) == (0.0, {})
    assert_unchanged(model, before)


def test_relu6_share_of_a_real_model_names_every_relu6(digits16):
    model = rep_model("rep_mobilenet_v2")
    share, per_layer = relu6_clipped_share(model, digits16[0])
    assert list(per_layer) == [n for n, m in model.named_modules() if isinstance(m, nn.ReLU6)]
    assert 0 < share < 1 and all(0 <= v <= 1 for v in per_layer.values())


# ---------------------------------------------------------------------- zoo: pipeline_steps and the "pipeline" recipe
#: tiny settings: one fp32 epoch at 8x8, no QAT epoch, one calibration batch (seconds, not minutes)
TINY = dict(fp32_epochs=1, image_size=8, epochs=0, calib_batches=1, progress=False)
STEPS_TINY = dict(epochs=1, image_size=8, progress=False)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """FUSIONLIB_CACHE and XDG_CACHE_HOME in a temporary folder, and an empty pipeline_steps memo, for this module."""
    root = tmp_path_factory.mktemp("pipeline-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSIONLIB_CACHE", str(root / "cache"))
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        mp.setattr(zoo, "_PIPELINE_STEPS", {})
        yield root / "cache"


def _key(run: zoo.Run) -> str:
    return run.path.name.rsplit("-", 1)[1].removesuffix(".pt")


def test_pipeline_steps_returns_deep_copies(tiny_cache):
    first = zoo.pipeline_steps("mobilenet_v2", **STEPS_TINY)
    assert list(first.models) == list(FLOAT_STEPS)
    kept = {k: v.clone() for k, v in first.last.state_dict().items()}
    with torch.no_grad():
        for p in first.last.parameters():
            p.zero_()
    second = zoo.pipeline_steps("rep_mobilenet_v2", **STEPS_TINY)   # the rep_ name: the same steps
    x = data.digits_tensors(image_size=8)[2][:16]
    out = outputs(second, x)
    for step, ref in second.exact_pairs():   # a trained, recalibrated model: measured at most 5.4e-6
        assert compare_outputs(out[ref], out[step], rtol=1e-5).passed, (step, ref)
    for k, v in second.last.state_dict().items():
        assert torch.equal(v, kept[k]), k
    assert not _storages(first.last) & _storages(second.last)


def test_pipeline_key_changes_with_every_recipe_parameter(tiny_cache, monkeypatch):
    base = zoo.pipeline_run("mobilenet_v2", **TINY)
    assert base.path.parent == tiny_cache and base.path.name.startswith("pipeline-mobilenet_v2-")
    assert zoo.pipeline_run("rep_mobilenet_v2", **TINY).path == base.path
    assert zoo.pipeline_run("mobilenet_v2", **dict(TINY, progress=True)).path == base.path
    changes = dict(equalize=False, cle_iterations=5, weight_per_channel=False, weight_bits=4, activation_bits=4,
                   epochs=2, lr=0.01, calib_batches=2)
    keys = {"base": _key(base)}
    for param, value in changes.items():
        keys[param] = _key(zoo.pipeline_run("mobilenet_v2", **dict(TINY, **{param: value})))
    # seed, fp32_epochs and image_size change the rep model's training: its key (zoo.plain_run's), not trained here
    rep_keys = []

    def rep_only(name, progress=True, **params):
        rep_keys.append(_key(zoo.plain_run(name, **params)))
        return None, {"key": rep_keys[-1]}

    monkeypatch.setattr(zoo, "trained_model", rep_only)
    assert _key(zoo.pipeline_run("mobilenet_v2", **TINY)) == keys["base"]   # the stand-in gives the real key
    for param, value in dict(seed=1, fp32_epochs=2, image_size=16).items():
        keys[param] = _key(zoo.pipeline_run("mobilenet_v2", **dict(TINY, **{param: value})))
    assert len(set(rep_keys)) == 4
    assert len(set(keys.values())) == len(keys), keys


def test_pipeline_recipe_is_cached_and_reloads_the_same_model(tiny_cache):
    x = data.digits_tensors(image_size=8)[2][:16]
    first, metrics = zoo.trained_model("mobilenet_v2", "pipeline", **TINY)
    again, cached = zoo.trained_model("mobilenet_v2", "pipeline", **TINY)
    assert not metrics["cached"] and cached["cached"]
    assert metrics["path"] == cached["path"] == str(zoo.pipeline_run("mobilenet_v2", **TINY).path)
    assert metrics["key"] == cached["key"] and metrics["path"].startswith(str(tiny_cache))
    assert again is not first
    with torch.no_grad():
        assert torch.equal(first(x), again(x))
    # equalized: ReLU6 was replaced before QAT
    assert not any(isinstance(m, nn.ReLU6) for m in first.modules())
    assert any(isinstance(m, nn.ReLU) for m in first.modules())


def test_pipeline_without_equalize_keeps_relu6(tiny_cache):
    model, metrics = zoo.trained_model("mobilenet_v2", "pipeline", **dict(TINY, equalize=False))
    assert metrics["params"]["equalize"] is False
    relu6 = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU6)]
    assert len(relu6) == 35   # every ReLU6 of rep_mobilenet_v2
    assert any(type(m).__name__ == "QATConv2d" for m in model.modules())


@pytest.mark.parametrize("call", [
    lambda: zoo.pipeline_steps("vgg", **STEPS_TINY),
    lambda: zoo.pipeline_run("vgg", **TINY),
    lambda: zoo.trained_model("vgg", "pipeline", **TINY),
])
def test_a_bad_name_is_an_error_naming_it_before_anything_trains(call, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="'vgg'"):
        call()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("bad", [True, 2.5, -1])
def test_pipeline_run_checks_cle_iterations_as_float_steps_does(bad, tiny_cache):
    with pytest.raises(ValueError, match="cle_iterations"):
        zoo.pipeline_run("mobilenet_v2", **dict(TINY, cle_iterations=bad))


@pytest.mark.parametrize("bad", [-1, 1.5, "1"])
def test_a_bad_qat_epochs_is_an_error_before_anything_trains(bad, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=re.escape(f"epochs must be an int >= 0, got {bad!r}")):
        zoo.pipeline_run("mobilenet_v2", **dict(TINY, epochs=bad))
    assert not (tmp_path / "cache").exists()


def test_output_step_is_the_output_quantizers_step_and_logits_lie_on_it():
    from fusionlib.quant import calibrate
    from fusionlib.quant.qat import prepare_qat
    from fusionlib.pipeline import output_step

    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    gm = prepare_qat(model, x[:2])
    with pytest.raises(ValueError, match="calibrated prepare_qat graph"):
        output_step(gm)                                              # no amax yet
    calibrate(gm, [x])
    step = output_step(gm.eval())
    with torch.no_grad():
        logits = gm(x)
    assert step > 0 and torch.allclose(logits / step, (logits / step).round(), atol=1e-4)   # multiples of the step
    with pytest.raises(ValueError, match="Sequential"):
        output_step(model)
