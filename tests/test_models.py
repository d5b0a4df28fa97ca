"""fusionlib.models: builders, fusion groups, fuse_model against the unfused model, trained_model's cache."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from fusionlib import models, recipes, zoo
from fusionlib.verify import compare_outputs
from batchnorm_stats import randomize_batchnorm


# ----------------------------------------------------------------------------- builders
def test_builders_keep_torchvision_module_names():
    for name, reference in [
        ("resnet18", torchvision.models.resnet18(weights=None, num_classes=10)),
        ("mobilenet_v2", torchvision.models.mobilenet_v2(weights=None, num_classes=10)),
    ]:
        model = models.build(name, num_classes=10)
        assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
        assert {k: v.shape for k, v in model.state_dict().items()} == {
            k: v.shape for k, v in reference.state_dict().items()
        }


def test_small_input_mobilenet_ends_in_2x2_instead_of_1x1():
    x = torch.zeros(1, 3, 32, 32)
    small, standard = models.mobilenet_v2(small_input=True), models.mobilenet_v2(small_input=False)
    assert small.features[7].conv[1][0].stride == (1, 1) and standard.features[7].conv[1][0].stride == (2, 2)
    with torch.no_grad():
        assert small.eval().features(x).shape == (1, 1280, 2, 2)
        assert standard.eval().features(x).shape == (1, 1280, 1, 1)


def test_resnet18_logits_shape_and_unknown_name():
    model = models.resnet18(num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="resnet50"):
        models.build("resnet50")


# ----------------------------------------------------------------------------- fusion groups
def _check_group_types(model: nn.Module, groups: list[list[str]]) -> None:
    for group in groups:
        conv, bn = model.get_submodule(group[0]), model.get_submodule(group[1])
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d), group
        assert conv.out_channels == bn.num_features, group
    names = [n for g in groups for n in g]
    assert len(names) == len(set(names)), "a module listed twice"


def test_resnet18_groups():
    model = models.resnet18()
    groups = recipes.fusion_groups(model)
    assert len(groups) == 20  # 1 stem + 8 blocks * 2 conv-bn + 3 downsample
    assert groups[0] == ["conv1", "bn1", "relu"]
    assert ["layer1.0.conv1", "layer1.0.bn1"] in groups and ["layer4.1.conv2", "layer4.1.bn2"] in groups
    downsample = [g for g in groups if "downsample" in g[0]]
    assert downsample == [[f"layer{i}.0.downsample.0", f"layer{i}.0.downsample.1"] for i in (2, 3, 4)]
    # A block's shared ReLU (used after bn1 and after the add) is never fused.
    assert not any(name.endswith(".relu") for g in groups for name in g)
    _check_group_types(model, groups[1:])
    # Every BatchNorm of the model is covered.
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bns == {g[1] for g in groups}


def test_mobilenet_v2_groups():
    model = models.mobilenet_v2()
    groups = recipes.fusion_groups(model)
    # features.0 + features.1 (dw, project) + 16 blocks * (expand, dw, project) + features.18
    assert len(groups) == 1 + 2 + 16 * 3 + 1 == 52
    assert groups[0] == ["features.0.0", "features.0.1"]
    assert groups[1:3] == [["features.1.conv.0.0", "features.1.conv.0.1"], ["features.1.conv.1", "features.1.conv.2"]]
    assert groups[3:6] == [
        ["features.2.conv.0.0", "features.2.conv.0.1"],
        ["features.2.conv.1.0", "features.2.conv.1.1"],
        ["features.2.conv.2", "features.2.conv.3"],
    ]
    assert groups[-1] == ["features.18.0", "features.18.1"]
    _check_group_types(model, groups)
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bns == {g[1] for g in groups}


def test_groups_are_found_by_walking_any_width_or_depth():
    assert len(recipes.fusion_groups(torchvision.models.resnet34(weights=None, num_classes=3))) == 1 + 16 * 2 + 3
    wide = torchvision.models.mobilenet_v2(weights=None, num_classes=5, width_mult=0.5)
    assert len(recipes.fusion_groups(wide)) == 52
    _check_group_types(wide, recipes.fusion_groups(wide))


def test_fuse_model_on_bare_blocks():
    """BasicBlock, ConvBNReLU (Conv2dNormActivation) and InvertedResidual fuse on their own."""
    torch.manual_seed(0)
    resnet = randomize_batchnorm(models.resnet18()).eval()
    mobilenet = randomize_batchnorm(models.mobilenet_v2()).eval()
    cases = [  # block, expected groups (names relative to the block), input
        (resnet.layer2[0], [["conv1", "bn1"], ["conv2", "bn2"], ["downsample.0", "downsample.1"]], (2, 64, 8, 8)),
        (mobilenet.features[0], [["0", "1"]], (2, 3, 16, 16)),
        (mobilenet.features[2], [["conv.0.0", "conv.0.1"], ["conv.1.0", "conv.1.1"], ["conv.2", "conv.3"]],
         (2, 16, 8, 8)),
    ]
    for block, expected, shape in cases:
        assert recipes.fusion_groups(block) == expected
        fused = recipes.fuse_model(block)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        x = torch.randn(shape)
        with torch.inference_mode():
            result = compare_outputs(block(x), fused(x), rtol=1e-4, name=type(block).__name__)
        assert result.passed, str(result)


def test_unknown_architecture_is_a_type_error_naming_it():
    class TinyNet(nn.Sequential):
        pass

    with pytest.raises(TypeError, match="TinyNet"):
        recipes.fusion_groups(TinyNet(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(TypeError, match="TinyNet"):
        recipes.fuse_model(TinyNet(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())


# ----------------------------------------------------------------------------- fuse_model
@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def model_and_fused(request):
    torch.manual_seed(0)
    model = randomize_batchnorm(models.build(request.param)).eval()
    before = copy.deepcopy(model.state_dict())
    fused = recipes.fuse_model(model)
    return request.param, model, fused, before


def test_fused_matches_unfused_on_digits(model_and_fused, digits_batch):
    name, model, fused, _ = model_and_fused
    with torch.inference_mode():
        reference, candidate = model(digits_batch), fused(digits_batch)
    result = compare_outputs(reference, candidate, rtol=1e-4, name=f"{name} digits")
    assert result.passed, str(result)
    assert float(reference.std()) > 0.01  # the check compared real, varied logits


def test_fused_matches_unfused_on_sample_photos(model_and_fused, photo_batch):
    name, model, fused, _ = model_and_fused
    with torch.inference_mode():
        reference, candidate = model(photo_batch), fused(photo_batch)
    result = compare_outputs(reference, candidate, rtol=1e-4, name=f"{name} photos")
    assert result.passed, str(result)


def test_every_grouped_batchnorm_became_identity(model_and_fused):
    name, model, fused, before = model_and_fused
    for group in recipes.fusion_groups(model):
        for member in group[1:]:
            assert isinstance(fused.get_submodule(member), nn.Identity), member
        conv = fused.get_submodule(group[0])
        if len(group) == 3:  # conv-bn-relu -> ConvReLU2d(conv, relu)
            assert isinstance(conv[1], nn.ReLU), group
            conv = conv[0]
        assert isinstance(conv, nn.Conv2d) and conv.bias is not None, group  # the folded shift is the bias
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    if name == "resnet18":  # the stem ReLU went into the first conv; block ReLUs stayed
        assert isinstance(fused.relu, nn.Identity)
        assert all(isinstance(block.relu, nn.ReLU) for layer in (fused.layer1, fused.layer4) for block in layer)
    # inplace=False: the caller's model is untouched.
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fuse_model_refuses_training_mode_and_leaves_the_model_as_it_was():
    model = models.resnet18().train()
    with pytest.raises(ValueError, match="eval"):
        recipes.fuse_model(model)
    model.eval()
    model.layer2[0].bn1.train()
    with pytest.raises(ValueError, match="layer2.0.bn1"):
        recipes.fuse_model(model, inplace=True)
    assert isinstance(model.layer2[0].bn1, nn.BatchNorm2d) and isinstance(model.bn1, nn.BatchNorm2d)


def test_fuse_model_inplace_returns_the_same_model():
    model = models.mobilenet_v2().eval()
    fused = recipes.fuse_model(model, inplace=True)
    assert fused is model and isinstance(model.features[0][1], nn.Identity)


# ----------------------------------------------------------------------------- trained_model
def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("FUSIONLIB_CACHE")
    assert zoo.cache_dir() == tmp_path / "xdg" / "fusionlib"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "fusionlib"


def test_cache_key_depends_on_every_parameter():
    base = {"name": "resnet18", "epochs": 3, "lr": 0.03}
    keys = {zoo.cache_key(base), zoo.cache_key({**base, "epochs": 4}), zoo.cache_key({**base, "lr": 0.031})}
    assert len(keys) == 3 and zoo.cache_key(dict(reversed(base.items()))) == zoo.cache_key(base)


TINY = dict(name="resnet18", epochs=1, image_size=8, batch_size=64, progress=False)  # a tiny run: one epoch on 8x8 inputs


def test_trained_model_trains_once_then_loads_identical_weights(monkeypatch, tmp_path):
    from fusionlib.train import evaluate

    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    model, metrics = zoo.trained_model(**TINY)
    assert metrics["cached"] is False and not model.training
    assert set(metrics) >= {"test_accuracy", "train_seconds", "epochs", "cached", "history"}
    assert metrics["epochs"] == 1 and len(metrics["history"]) == 1 and metrics["train_seconds"] > 0
    files = list(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".pt"] and files[0].name.startswith("resnet18-")  # no temp file left

    # One epoch on real digits learns something, and the metric is the model's real accuracy.
    from fusionlib.data import digits_loaders

    _, test_loader = digits_loaders(batch_size=128, image_size=8)
    assert metrics["test_accuracy"] == pytest.approx(evaluate(model, test_loader))
    assert metrics["test_accuracy"] > 0.3  # chance is 0.1

    again, metrics_again = zoo.trained_model(**TINY)
    assert metrics_again["cached"] is True and not again.training
    assert metrics_again["test_accuracy"] == metrics["test_accuracy"]
    assert metrics_again["train_seconds"] == metrics["train_seconds"]
    state, state_again = model.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys() and all(torch.equal(state[k], state_again[k]) for k in state)


def test_trained_model_retrains_from_scratch_over_a_bad_cache_file(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    kwargs = dict(epochs=1, image_size=8, batch_size=256, progress=False)
    params = {
        "name": "mobilenet_v2", "epochs": 1, "image_size": 8, "seed": 0, "batch_size": 256,
        "lr": zoo.DEFAULT_LR["mobilenet_v2"], "momentum": 0.9, "weight_decay": 5e-4,
        "channels": 3, "small_input": True, "test_fraction": 0.2,
    }  # fmt: skip
    path = tmp_path / f"mobilenet_v2-{zoo.cache_key(params)}.pt"
    # A stale entry: other weights plus an unexpected key, so load_state_dict copies, then fails.
    torch.manual_seed(99)
    stale = dict(models.mobilenet_v2().state_dict(), unexpected=torch.zeros(1))
    torch.save({"state_dict": stale, "metrics": {}}, path)
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        model, metrics = zoo.trained_model("mobilenet_v2", **kwargs)
    assert metrics["cached"] is False and Path(metrics["path"]) == path
    # Retrained from the seeded initialization, not from the half-loaded stale weights.
    clean, _ = zoo.trained_model("mobilenet_v2", use_cache=False, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), clean.state_dict().values()))
    assert zoo.trained_model("mobilenet_v2", **kwargs)[1]["cached"]


# ----------------------------------------------------------------------------- module layout
def test_zoo_and_recipes_import_first_in_a_fresh_interpreter():
    """zoo uses models' builders and models knows neither zoo nor recipes: each imports first on its own."""
    import subprocess
    import sys

    for code in ("import fusionlib.zoo", "import fusionlib.recipes",
                 "import fusionlib.models as m; assert not hasattr(m, 'trained_model')"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr


def test_set_input_channels_replaces_the_first_conv_under_its_own_name():
    from fusionlib.zoo import _set_input_channels

    for name, first in (("resnet18", "conv1"), ("mobilenet_v2", "features.0.0")):
        model = models.build(name).eval()
        old = model.get_submodule(first)
        _set_input_channels(model, 1)
        new = model.get_submodule(first)
        assert new is not old and new.in_channels == 1 and new.weight.shape[0] == old.weight.shape[0]
        assert (new.kernel_size, new.stride, new.padding) == (old.kernel_size, old.stride, old.padding)
        with torch.no_grad():
            assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


# ----------------------------------------------------------------------------- re-parameterizable models
REP_NAMES = {"rep_resnet18": "resnet18", "rep_mobilenet_v2": "mobilenet_v2"}


def test_rep_builders_are_registered_with_training_defaults():
    from fusionlib import zoo

    for rep, plain in REP_NAMES.items():
        assert models.REP_BUILDERS[rep] is getattr(models, rep) is models.ALL_BUILDERS[rep]
        assert rep not in models.BUILDERS, "BUILDERS lists the course's two architectures only"
        assert zoo.DEFAULT_LR[rep] > 0 and zoo.SECONDS_PER_EPOCH_32[rep] >= zoo.SECONDS_PER_EPOCH_32[plain]


@pytest.mark.parametrize("rep", list(REP_NAMES))
def test_rep_models_keep_torchvision_names_with_a_repblock_where_the_pair_was(rep):
    from fusionlib.reparam import RepBlock

    model, plain = models.build(rep), models.build(REP_NAMES[rep])
    rep_modules, plain_modules = dict(model.named_modules()), dict(plain.named_modules())
    assert set(plain_modules) <= set(rep_modules)  # every torchvision name is still there
    replaced = {name for name, m in model.named_modules() if isinstance(m, RepBlock)}
    for name in replaced:
        # the BatchNorm after it: layerX.Y.convK -> layerX.Y.bnK; features.i.conv.j.0 -> features.i.conv.j.1
        bn_name = name.replace(".conv", ".bn") if rep == "rep_resnet18" else name.removesuffix(".0") + ".1"
        conv, block = plain_modules[name], rep_modules[name]
        assert isinstance(rep_modules[bn_name], nn.Identity) and isinstance(plain_modules[bn_name], nn.BatchNorm2d)
        assert (block.in_channels, block.out_channels, block.kernel_size, (block.stride,) * 2, block.groups) == (
            conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride, conv.groups)
        assert block.conv_kxk[0].weight.shape == conv.weight.shape
    if rep == "rep_resnet18":
        assert replaced == {f"layer{i}.{j}.conv{k}" for i in (1, 2, 3, 4) for j in (0, 1) for k in (1, 2)}
        assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.bn1, nn.BatchNorm2d)  # the 7x7 stem stays
    else:
        assert len(replaced) == 17 and all(rep_modules[n].groups == rep_modules[n].in_channels for n in replaced)
        assert model.features[7].conv[1][0].stride == 1  # small_input carries over
        assert models.rep_mobilenet_v2(small_input=False).features[7].conv[1][0].stride == 2
    # every parameter outside the RepBlocks has the plain model's name and shape
    rep_state = {k: v.shape for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in replaced)}
    plain_state = {k: v.shape for k, v in plain.state_dict().items()
                   if not any(k.startswith(n + ".") for n in replaced) and k.rsplit(".", 1)[0] in rep_modules
                   and isinstance(rep_modules[k.rsplit(".", 1)[0]], (nn.Conv2d, nn.BatchNorm2d, nn.Linear))}
    assert rep_state == plain_state


@pytest.mark.parametrize("rep, groups", [("rep_resnet18", 4), ("rep_mobilenet_v2", 52 - 17)])
def test_fusion_groups_and_fuse_model_on_deployed_rep_models(rep, groups, digits_batch):
    from fusionlib.reparam import reparameterize_model

    model = randomize_batchnorm(models.build(rep)).eval()
    deployed = reparameterize_model(model)
    assert len(recipes.fusion_groups(deployed)) == groups  # only the convs that were never RepBlocks
    fused = recipes.fuse_model(deployed)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.inference_mode():
        result = compare_outputs(model(digits_batch), fused(digits_batch), rtol=1e-5, name=rep)
    assert result.passed, str(result)


def test_trained_model_trains_and_caches_a_rep_model(monkeypatch, tmp_path):
    from fusionlib.reparam import count_rep_blocks, reparameterize_model

    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    kwargs = dict(epochs=1, image_size=8, batch_size=256, channels=1, progress=False)
    model, metrics = zoo.trained_model("rep_mobilenet_v2", **kwargs)
    assert not metrics["cached"] and metrics["params"]["lr"] == zoo.DEFAULT_LR["rep_mobilenet_v2"]
    assert count_rep_blocks(model) == 17 and model.features[0][0].in_channels == 1
    again, metrics_again = zoo.trained_model("rep_mobilenet_v2", **kwargs)
    assert metrics_again["cached"] and count_rep_blocks(again) == 17
    x = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        result = compare_outputs(again(x), reparameterize_model(again)(x), rtol=1e-5, name="trained rep_mobilenet_v2")
    assert result.passed, str(result)


# ----------------------------------------------------------------------------- classifier dropout (notebook 12, R-Drop)
def test_resnet18_dropout_option_and_unchanged_default():
    default = models.resnet18()
    assert isinstance(default.fc, nn.Linear)  # torchvision's model, names unchanged (checked above too)
    with_dropout = models.build("resnet18", dropout=0.3)
    assert isinstance(with_dropout.fc, nn.Sequential) and isinstance(with_dropout.fc[0], nn.Dropout)
    assert with_dropout.fc[0].p == 0.3 and with_dropout.fc[1].in_features == 512
    assert {k for k in with_dropout.state_dict()} - {k for k in default.state_dict()} == {"fc.1.weight", "fc.1.bias"}
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        assert with_dropout.eval()(x).shape == (2, 10)
    assert isinstance(models.resnet18(dropout=0.0).fc, nn.Linear)


def test_mobilenet_v2_dropout_option_keeps_torchvisions_default():
    assert models.mobilenet_v2().classifier[0].p == 0.2
    assert models.build("mobilenet_v2", dropout=0.5).classifier[0].p == 0.5
    assert models.mobilenet_v2(dropout=0.0).classifier[0].p == 0.0


@pytest.mark.parametrize("dropout", [-0.1, 1.0, "0.2", True])
def test_bad_dropout_is_rejected(dropout):
    for name in models.BUILDERS:
        with pytest.raises(ValueError, match="dropout must be a probability in"):
            models.build(name, dropout=dropout)


def test_trained_model_dropout_keeps_the_cache_key_of_calls_without_it(monkeypatch):
    from fusionlib import train, zoo

    monkeypatch.setattr(train, "fit", lambda model, *args, **kwargs: [{"epoch": 1, "test_acc": 0.5}])
    _, plain = zoo.trained_model("resnet18", epochs=1, progress=False, use_cache=False)
    expected = {"name": "resnet18", "epochs": 1, "image_size": 32, "seed": 0, "batch_size": 64,
                "lr": zoo.DEFAULT_LR["resnet18"], "momentum": 0.9, "weight_decay": 5e-4, "channels": 3,
                "small_input": True, "test_fraction": 0.2}
    assert plain["params"] == expected and plain["key"] == zoo.cache_key(expected)
    model, dropped = zoo.trained_model("resnet18", epochs=1, progress=False, use_cache=False, dropout=0.25)
    assert dropped["params"] == dict(expected, dropout=0.25) and dropped["key"] != plain["key"]
    assert model.fc[0].p == 0.25
    with pytest.raises(ValueError, match="dropout is an option of resnet18 and mobilenet_v2"):
        zoo.trained_model("rep_resnet18", epochs=1, progress=False, use_cache=False, dropout=0.25)
