r"""Monkey patching: swap ``torch.nn``'s classes for quant classes, so models built afterwards are quantized (notebook 08).

A Python class is an object bound to a name in a module's namespace, and
``nn.Conv2d(...)`` looks that name up *when the line runs*. Rebinding the name
(``setattr(torch.nn, "Conv2d", QuantConv2d)``) therefore changes what every
later ``nn.Conv2d(...)`` builds — torchvision's ResNet / MobileNetV2
builders included, since they write ``nn.Conv2d(...)`` / ``torch.nn.Conv2d(...)``
inside their functions — while objects built earlier keep their class. This
is pytorch-quantization's ``quant_modules.initialize()``::

    initialize()                  # torch.nn.Conv2d is QuantConv2d from here on
    model = torchvision.models.resnet18()      # every conv a QuantConv2d, every linear a QuantLinear
    deactivate()                  # torch.nn.Conv2d is the original class again

What it cannot reach: a name copied *before* the patch (``from torch.nn import
Conv2d`` at the top of a file, or a default argument ``conv=nn.Conv2d``)
still names the float class, so build such code after the patch or use
:func:`fusionlib.quant.quantize_model` on the finished model.

**Sites.** torch exposes each class under several names: ``torch.nn.Conv2d``,
``torch.nn.modules.Conv2d`` and the defining ``torch.nn.modules.conv.Conv2d``
are one object. :data:`QUANT_MODULE_MAPPING` lists every such (module,
name, replacement) site for the sixteen classes of :mod:`fusionlib.quant.modules`,
so a lookup through any of them finds the quant class.

**Rules.**

* ``float_module_list`` — class names (``"Linear"``, ``"AvgPool2d"``, ...) to
  leave float; an unknown name is an error that lists the valid ones.
* ``custom_quant_modules`` — extra ``(module, name, replacement)`` entries,
  applied after the defaults. ``replacement`` must subclass the class it
  replaces (so ``isinstance`` checks in model code still hold). When the
  class it replaces is one the defaults patch, the custom replacement is used
  at *every* site of that class.
* Everything is checked before anything is patched, and the originals are
  saved first, so a failed call patches nothing.
* :func:`initialize` while already active is an error (deactivate first):
  a second call would otherwise save the quant classes as "originals".
* :func:`deactivate` puts back exactly the saved objects
  (``torch.nn.Conv2d is`` the original); without :func:`initialize` it does
  nothing. :func:`enable_quantization` is the ``with`` form, which
  deactivates even when its body raises.

While active, ``nn.Conv2d`` *is* ``QuantConv2d``, so ``isinstance(m, nn.Conv2d)``
is False for a float conv built before the patch; and a whole model pickled
while patched cannot be pickled by its qualified name. Keep the patched
region short: build the model, then :func:`deactivate`.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch

from fusionlib.quant.modules import QUANT_MODULES

__all__ = [
    "QuantModuleEntry",
    "QUANT_MODULE_MAPPING",
    "QUANT_MODULE_NAMES",
    "initialize",
    "deactivate",
    "enable_quantization",
    "is_active",
    "saved_originals",
]


class QuantModuleEntry(NamedTuple):
    """One attribute site: ``setattr(module, name, replacement)`` while quantization is on."""

    module: Any  # a Python module (torch.nn, torch.nn.modules.conv, ...) or any object holding the class
    name: str
    replacement: type


def _sites_of(float_class: type) -> list[Any]:
    """The modules that bind ``float_class`` under its own name: torch.nn, torch.nn.modules, the defining module."""
    candidates = [torch.nn, importlib.import_module("torch.nn.modules"), sys.modules[float_class.__module__]]
    sites = []
    for module in candidates:
        if getattr(module, float_class.__name__, None) is float_class and module not in sites:
            sites.append(module)
    return sites


#: Every (module, class name, replacement) site patched by default.
QUANT_MODULE_MAPPING: list[QuantModuleEntry] = [
    QuantModuleEntry(module, float_class.__name__, quant_class)
    for float_class, quant_class in QUANT_MODULES.items()
    for module in _sites_of(float_class)
]

#: The names ``float_module_list`` accepts.
QUANT_MODULE_NAMES: tuple[str, ...] = tuple(float_class.__name__ for float_class in QUANT_MODULES)

#: The float originals, captured at import (before any patch could run).
_ORIGINALS: dict[str, type] = {float_class.__name__: float_class for float_class in QUANT_MODULES}

#: While active: the saved (module, name, original object) triples, in the order they were patched.
_saved: list[QuantModuleEntry] | None = None


def _site_name(module: Any) -> str:
    return module.__name__ if isinstance(module, types.ModuleType) else type(module).__name__


def _check_float_module_list(float_module_list: Iterable[str] | None) -> set[str]:
    if float_module_list is None:
        return set()
    if isinstance(float_module_list, str):
        raise TypeError(f"float_module_list takes a list of class names, got the string {float_module_list!r}; "
                        f"write [{float_module_list!r}]")
    names = list(float_module_list)
    unknown = [name for name in names if name not in QUANT_MODULE_NAMES]
    if unknown:
        raise ValueError(f"float_module_list has unknown class name(s) {unknown}; valid names: "
                         f"{list(QUANT_MODULE_NAMES)}")
    return set(names)


def _check_custom_entries(custom_quant_modules: Sequence[Any] | None) -> list[QuantModuleEntry]:
    if custom_quant_modules is None:
        return []
    entries = []
    for i, entry in enumerate(custom_quant_modules):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 3):
            raise ValueError(f"custom_quant_modules[{i}] must be a (module, name, replacement) triple, got {entry!r}")
        module, name, replacement = entry
        if not isinstance(name, str) or not hasattr(module, name):
            raise ValueError(f"custom_quant_modules[{i}]: {_site_name(module)} has no attribute {name!r}")
        original = getattr(module, name)
        if not isinstance(original, type):
            raise ValueError(f"custom_quant_modules[{i}]: {_site_name(module)}.{name} is not a class, "
                             f"got {type(original).__name__}")
        if not (isinstance(replacement, type) and issubclass(replacement, original)):
            raise ValueError(f"custom_quant_modules[{i}]: the replacement for {_site_name(module)}.{name} must be a "
                             f"subclass of {original.__qualname__} (so isinstance checks still hold), got {replacement!r}")
        entries.append(QuantModuleEntry(module, name, replacement))
    return entries


def _plan(float_module_list: Iterable[str] | None, custom_quant_modules: Sequence[Any] | None) -> list[QuantModuleEntry]:
    """Every site to patch, decided and checked before anything changes."""
    keep_float = _check_float_module_list(float_module_list)
    custom = _check_custom_entries(custom_quant_modules)
    plan: dict[tuple[int, str], QuantModuleEntry] = {}
    for entry in QUANT_MODULE_MAPPING:
        if entry.name not in keep_float:
            plan[(id(entry.module), entry.name)] = entry
    for entry in custom:
        original = getattr(entry.module, entry.name)
        plan[(id(entry.module), entry.name)] = entry
        for default in QUANT_MODULE_MAPPING:  # the same class at its other sites gets the same replacement
            if _ORIGINALS[default.name] is original:
                plan[(id(default.module), default.name)] = QuantModuleEntry(default.module, default.name, entry.replacement)
    return list(plan.values())


def is_active() -> bool:
    """True between :func:`initialize` and :func:`deactivate`."""
    return _saved is not None


def saved_originals() -> list[tuple[str, str, type]]:
    """While active: ``(module name, attribute, original class)`` for every patched site; else ``[]``."""
    return [(_site_name(e.module), e.name, e.replacement) for e in (_saved or [])]


def initialize(float_module_list: Iterable[str] | None = None,
               custom_quant_modules: Sequence[Any] | None = None) -> None:
    """Replace torch.nn's classes by quant classes until :func:`deactivate` (see the module docstring).

    ``float_module_list``: class names to leave float (``QUANT_MODULE_NAMES``).
    ``custom_quant_modules``: extra ``(module, name, replacement)`` entries.
    Raises RuntimeError when already active, ValueError / TypeError on bad
    arguments; in every error case nothing is patched.
    """
    global _saved
    if _saved is not None:
        patched = sorted({f"{site}.{name}" for site, name, _ in saved_originals()})
        raise RuntimeError(f"quantization is already initialized (patched: {', '.join(patched[:4])}, ...); "
                           "call deactivate() first")
    plan = _plan(float_module_list, custom_quant_modules)
    saved = [QuantModuleEntry(e.module, e.name, getattr(e.module, e.name)) for e in plan]
    applied: list[QuantModuleEntry] = []
    try:
        for entry, original in zip(plan, saved):
            setattr(entry.module, entry.name, entry.replacement)
            applied.append(original)
    except BaseException:  # put back what was patched before the failure, then report it
        for entry in reversed(applied):
            setattr(entry.module, entry.name, entry.replacement)
        raise
    _saved = saved


def deactivate() -> bool:
    """Put back the classes :func:`initialize` replaced (the same objects). Harmless when not active.

    Returns True when something was restored.
    """
    global _saved
    if _saved is None:
        return False
    for entry in reversed(_saved):
        setattr(entry.module, entry.name, entry.replacement)
    _saved = None
    return True


@contextlib.contextmanager
def enable_quantization(float_module_list: Iterable[str] | None = None,
                        custom_quant_modules: Sequence[Any] | None = None) -> Iterator[None]:
    """``with enable_quantization(): model = build(...)`` -- :func:`initialize`, then :func:`deactivate` on exit, even on error."""
    initialize(float_module_list, custom_quant_modules)
    try:
        yield
    finally:
        deactivate()
