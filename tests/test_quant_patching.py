"""fusionlib.quant.patching: initialize / deactivate swap torch.nn's classes and put back exactly the originals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.modules.conv
import torch.nn.modules.linear
import torch.nn.modules.pooling
import torchvision
from torch import nn

from fusionlib import models
from fusionlib.quant import (
    QUANT_MODULE_MAPPING,
    QUANT_MODULE_NAMES,
    QUANT_MODULES,
    QuantConv2d,
    QuantLinear,
    deactivate,
    enable_quantization,
    initialize,
    is_active,
    saved_originals,
)

FLOAT_CLASSES = {cls.__name__: cls for cls in QUANT_MODULES}  # the originals, captured when fusionlib.quant was imported
SITES = [torch.nn, torch.nn.modules, torch.nn.modules.conv, torch.nn.modules.linear, torch.nn.modules.pooling]


def site_snapshot() -> dict:
    """Every attribute of every site module, by identity (catches any stray patch, not only ours)."""
    return {(site.__name__, name): id(value) for site in SITES for name, value in vars(site).items()}


@pytest.fixture(autouse=True)
def always_deactivated():
    assert not is_active()
    before = site_snapshot()
    yield
    deactivate()
    assert site_snapshot() == before


def assert_originals() -> None:
    for name, cls in FLOAT_CLASSES.items():
        assert getattr(torch.nn, name) is cls and getattr(torch.nn.modules, name) is cls
        assert getattr(__import__(cls.__module__, fromlist=[name]), name) is cls


def test_mapping_covers_every_site_of_every_class():
    assert set(QUANT_MODULE_NAMES) == {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                                       "ConvTranspose3d", "Linear", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d",
                                       "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d",
                                       "AdaptiveAvgPool3d"}
    sites = {(entry.module.__name__, entry.name) for entry in QUANT_MODULE_MAPPING}
    assert ("torch.nn", "Conv2d") in sites and ("torch.nn.modules.conv", "Conv2d") in sites
    assert ("torch.nn.modules", "Linear") in sites and ("torch.nn.modules.linear", "Linear") in sites
    assert len(sites) == 3 * len(QUANT_MODULE_NAMES)
    for entry in QUANT_MODULE_MAPPING:
        assert issubclass(entry.replacement, FLOAT_CLASSES[entry.name])


def test_round_trip_restores_the_very_same_class_objects():
    assert_originals()
    initialize()
    assert is_active()
    for entry in QUANT_MODULE_MAPPING:
        assert getattr(entry.module, entry.name) is entry.replacement
    assert nn.Conv2d is QuantConv2d and torch.nn.modules.conv.Conv2d is QuantConv2d
    assert {(site, name) for site, name, _ in saved_originals()} == {
        (e.module.__name__, e.name) for e in QUANT_MODULE_MAPPING}
    assert all(cls is FLOAT_CLASSES[name] for _, name, cls in saved_originals())
    assert deactivate() is True
    assert not is_active() and saved_originals() == []
    assert_originals()


def test_deactivate_without_initialize_is_harmless():
    assert deactivate() is False
    assert deactivate() is False
    assert_originals()


def test_initialize_twice_is_an_error_and_changes_nothing():
    initialize(float_module_list=["Linear"])
    saved = saved_originals()
    with pytest.raises(RuntimeError, match=r"already initialized .*call deactivate\(\) first"):
        initialize()
    assert saved_originals() == saved and nn.Linear is FLOAT_CLASSES["Linear"] and nn.Conv2d is QuantConv2d
    deactivate()
    assert_originals()  # the originals, not the quant classes, came back


def test_context_manager_restores_even_when_the_body_raises():
    with pytest.raises(ZeroDivisionError):
        with enable_quantization():
            assert nn.Conv2d is QuantConv2d
            1 / 0
    assert not is_active()
    assert_originals()


def test_models_built_under_the_patch_are_quantized_and_earlier_objects_keep_their_class():
    before = nn.Conv2d(3, 3, 1)
    from torch.nn import Conv2d as captured  # a name copied before the patch: the "from x import y" trap
    with enable_quantization():
        resnet = torchvision.models.resnet18(weights=None, num_classes=10)
        mobilenet = models.build("mobilenet_v2", num_classes=10)  # its small_input check sees a QuantConv2d
        trap = captured(3, 3, 1)
    assert type(before) is FLOAT_CLASSES["Conv2d"] and type(trap) is FLOAT_CLASSES["Conv2d"]
    for model in (resnet, mobilenet):
        kinds = {type(m) for m in model.modules()}
        assert QuantConv2d in kinds and QuantLinear in kinds
        assert not kinds & set(FLOAT_CLASSES.values())  # not a single float conv / linear / pool left
    assert isinstance(resnet.conv1, nn.Conv2d)  # after deactivate: still a Conv2d to everyone


def test_float_module_list_leaves_the_named_classes_alone():
    with enable_quantization(float_module_list=["Linear", "AdaptiveAvgPool2d"]):
        assert nn.Linear is FLOAT_CLASSES["Linear"] and torch.nn.modules.linear.Linear is FLOAT_CLASSES["Linear"]
        assert nn.Conv2d is QuantConv2d
        resnet = torchvision.models.resnet18(weights=None, num_classes=10)
    assert type(resnet.fc) is FLOAT_CLASSES["Linear"] and type(resnet.avgpool) is nn.AdaptiveAvgPool2d
    assert type(resnet.conv1) is QuantConv2d


class LoggingReLU(nn.ReLU):
    """A custom replacement: subclasses the class it replaces."""


class MyQuantConv2d(QuantConv2d):
    pass


def test_custom_quant_modules_add_entries_and_replace_a_default_at_every_site():
    relu = nn.ReLU
    with enable_quantization(custom_quant_modules=[(torch.nn, "ReLU", LoggingReLU),
                                                   (torch.nn, "Conv2d", MyQuantConv2d)]):
        assert nn.ReLU is LoggingReLU
        assert nn.Conv2d is MyQuantConv2d and torch.nn.modules.conv.Conv2d is MyQuantConv2d
        assert torch.nn.modules.Conv2d is MyQuantConv2d
        resnet = torchvision.models.resnet18(weights=None)
    assert nn.ReLU is relu
    assert type(resnet.relu) is LoggingReLU and type(resnet.conv1) is MyQuantConv2d


class Unsettable:
    """An attribute site whose setattr fails: initialize must roll back what it already patched."""

    Linear = nn.Linear

    def __setattr__(self, name, value):
        raise AttributeError("read-only site")


BAD_INPUTS = [
    (dict(float_module_list=["Linear", "Conv"]), ValueError,
     r"unknown class name\(s\) \['Conv'\]; valid names: \['Conv1d', 'Conv2d'.*'AdaptiveAvgPool3d'\]"),
    (dict(float_module_list="Linear"), TypeError, r"takes a list of class names, got the string 'Linear'"),
    (dict(custom_quant_modules=[(torch.nn, "ReLU")]), ValueError, r"\[0\] must be a \(module, name, replacement\)"),
    (dict(custom_quant_modules=[(torch.nn, "Relu", LoggingReLU)]), ValueError, r"torch.nn has no attribute 'Relu'"),
    (dict(custom_quant_modules=[(torch.nn, "ReLU", QuantConv2d)]), ValueError, r"must be a subclass of ReLU"),
    (dict(custom_quant_modules=[(torch.nn, "ReLU", LoggingReLU()), ]), ValueError, r"must be a subclass of ReLU"),
    (dict(custom_quant_modules=[(torch.nn.functional, "relu", LoggingReLU)]), ValueError, r"relu is not a class"),
    (dict(custom_quant_modules=[(Unsettable(), "Linear", QuantLinear)]), AttributeError, r"read-only site"),
]


@pytest.mark.parametrize("kwargs, error, pattern", BAD_INPUTS)
def test_bad_input_is_rejected_and_nothing_is_patched(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        initialize(**kwargs)
    assert not is_active()
    assert_originals()
    with pytest.raises(error, match=pattern):
        with enable_quantization(**kwargs):
            pass
    assert_originals()
