"""Module fusion with ``torch.ao.quantization``'s interface, written from scratch.

:func:`fuse_modules` takes a model and groups of dotted names
(``[["conv1", "bn1", "relu"], ["layer1.0.conv1", "layer1.0.bn1"], ...]``) and
replaces each group by one fused module followed by ``nn.Identity`` s. Which
module a group becomes is looked up by its type sequence in a table of fuser
methods (:func:`get_fuser_method`, :func:`supported_fusions`):

* Conv+BN, ConvTranspose+BN, Linear+BN -> one layer with BatchNorm folded in
  (the arithmetic: :mod:`fusionlib.folding`, ``W' = W·γ/√(σ²+ε)``,
  ``b' = (b−μ)·γ/√(σ²+ε) + β``);
* Conv+BN+ReLU -> ``ConvReLUNd(folded conv, relu)``; Conv+ReLU, Linear+ReLU,
  BN+ReLU -> the containers of :mod:`fusionlib.fused_modules`;
* :func:`fuse_modules_qat` keeps BatchNorm trainable in ConvBnNd /
  ConvBnReLUNd / LinearBn1d instead of folding it.

This module also re-exports every public name of :mod:`fusionlib.folding`
and :mod:`fusionlib.fused_modules`, so ``fusionlib.fusion`` offers everything
its torch namesakes do: ``fuse_conv_bn_weights``, ``fuse_conv_bn_eval``,
``fuse_linear_bn_weights``, ``fuse_linear_bn_eval``
(``torch.nn.utils.fusion``); ``get_fuser_method``, ``fuse_known_modules``,
``fuse_modules``, ``fuse_modules_qat`` (``torch.ao.quantization``);
``ConvReLU1d/2d/3d``, ``LinearReLU``, ``BNReLU1d/2d/3d``, ``ConvBn1d/2d/3d``,
``ConvBnReLU1d/2d/3d``, ``LinearBn1d`` (``torch.ao.nn.intrinsic``).

Where we deliberately differ from torch (see also :mod:`fusionlib.folding`)
------------------------------------------------------------------------
* Hooks: the first module's forward pre-hooks and the last module's forward
  hooks move to the fused module and run exactly once per forward (torch runs
  the pre-hooks twice after Conv+BN eval fusion); ``with_kwargs`` /
  ``always_call`` flags are kept, and handles returned by ``register_*_hook``
  still remove the moved hooks. Hooks that cannot survive (those on absorbed
  modules) are dropped with a ``UserWarning`` instead of silently.
* Errors are :class:`FusionError` (a ``ValueError`` that is also an
  ``AssertionError``, so code catching torch's asserts still works) or
  :class:`UnsupportedFusionError` (also a ``NotImplementedError``), with
  messages naming the module, its dotted name and the numbers involved.
* Nothing is half-applied: ``inplace=False`` deep-copies first; with
  ``inplace=True`` names and type sequences are checked before anything
  changes, and if a fuser fails halfway the model is restored.
* ``(BatchNorm1d, ReLU)`` fuses to :class:`BNReLU1d` (torch has no 1d form).
* ``(Conv2d, FrozenBatchNorm2d)`` and ``(Conv2d, FrozenBatchNorm2d, ReLU)`` fold
  torchvision's frozen BatchNorm (pretrained detection backbones), with its own eps.
* A subclass that keeps its parent's ``forward`` (``class MyConv(nn.Conv2d)``
  adding only a method, torchvision's ``Conv3DSimple``) fuses like the parent;
  one that overrides ``forward`` never does (the error says so).

:func:`fusionlib.auto_fuse.auto_fuse` (a layer above this module) finds the
groups by itself for models torch.fx cannot trace: one real forward pass records
the dataflow, and the outputs are verified before and after.
* The fused container's ``training`` flag is copied from the first module.
* Unknown keys in ``fuse_custom_config_dict`` are an error, not ignored.
"""
from __future__ import annotations

import copy
import difflib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils.parametrize import type_before_parametrizations

from fusionlib.folding import (
    _MODULE_NAMES,
    FusionError,
    _check_channels,
    _check_same_mode,
    _describe,
    frozen_batchnorm_class,
    fuse_bn_conv_eval,
    fuse_bn_conv_weights,
    fuse_conv_bn_eval,
    fuse_conv_bn_weights,
    fuse_linear_bn_eval,
    fuse_linear_bn_weights,
    is_batchnorm,
    stock_forward_base,
)
from fusionlib.fused_modules import (
    CONV_BN,
    CONV_BN_RELU,
    CONV_RELU,
    BNReLU1d,
    BNReLU2d,
    BNReLU3d,
    ConvBn1d,
    ConvBn2d,
    ConvBn3d,
    ConvBnReLU1d,
    ConvBnReLU2d,
    ConvBnReLU3d,
    ConvReLU1d,
    ConvReLU2d,
    ConvReLU3d,
    FusedSequential,
    LinearBn1d,
    LinearReLU,
)
from fusionlib import fused_modules
from fusionlib.modules import (HOOK_KINDS, HOOK_LABELS, attach_hook_dicts, hook_attributes, set_submodule,
                               stacklevel_outside_fusionlib)

__all__ = [
    "FusionError",
    "UnsupportedFusionError",
    "fuse_conv_bn_weights",
    "fuse_conv_bn_eval",
    "fuse_linear_bn_weights",
    "fuse_linear_bn_eval",
    "fuse_bn_conv_weights",
    "fuse_bn_conv_eval",
    "is_batchnorm",
    "stock_forward_base",
    "frozen_batchnorm_class",
    "fuse_conv_bn",
    "fuse_conv_bn_relu",
    "fuse_linear_bn",
    "fuse_convtranspose_bn",
    "get_fuser_method",
    "supported_fusions",
    "fuse_known_modules",
    "fuse_modules",
    "fuse_modules_qat",
    *fused_modules.__all__,  # the containers, re-exported
]

FuserMethod = Callable[..., nn.Module]


class UnsupportedFusionError(FusionError, NotImplementedError):
    """No fuser exists for this sequence of module types (or this mode)."""


# --------------------------------------------------------------------------
# Fuser methods: (is_qat, *modules) -> fused module
# --------------------------------------------------------------------------
def _check_trainable_bn(bn: _BatchNorm) -> None:
    if not bn.affine or not bn.track_running_stats:
        raise FusionError(
            f"{_describe(bn)} needs affine=True and track_running_stats=True for "
            f"fuse_modules_qat (got affine={bn.affine}, "
            f"track_running_stats={bn.track_running_stats})."
        )


def _check_qat_conv_bn(conv: _ConvNd, bn: _BatchNorm) -> None:
    _check_same_mode(conv, bn)
    _check_channels(conv, conv.out_channels, bn, "out_channels")
    _check_trainable_bn(bn)


def _computes_as(module: nn.Module) -> type[nn.Module]:
    """The module's type, or the torch class it subclasses without changing ``forward``."""
    cls = type_before_parametrizations(module)
    return stock_forward_base(cls) or cls


def _check_not_frozen_for_qat(bn: nn.Module) -> None:
    frozen = frozen_batchnorm_class()
    if frozen is not None and isinstance(bn, frozen):
        raise UnsupportedFusionError(
            f"{_describe(bn)} has no trainable statistics, so there is nothing for fuse_modules_qat to "
            "keep training: fold it with fuse_modules (eval mode) instead."
        )


def fuse_conv_bn(is_qat: bool, conv: _ConvNd, bn: _BatchNorm) -> nn.Module:
    """Conv+BN: eval -> one folded conv; QAT -> ConvBnNd keeping the BatchNorm."""
    if is_qat:
        _check_not_frozen_for_qat(bn)
        _check_qat_conv_bn(conv, bn)
        return CONV_BN[_computes_as(conv)](conv, bn)
    return fuse_conv_bn_eval(conv, bn)


def fuse_conv_bn_relu(is_qat: bool, conv: _ConvNd, bn: _BatchNorm, relu: nn.ReLU) -> nn.Module:
    """Conv+BN+ReLU: eval -> ConvReLUNd(folded conv, relu); QAT -> ConvBnReLUNd."""
    conv_type = _computes_as(conv)
    if is_qat:
        _check_not_frozen_for_qat(bn)
        _check_qat_conv_bn(conv, bn)
        return CONV_BN_RELU[conv_type](conv, bn, relu)
    return CONV_RELU[conv_type](fuse_conv_bn_eval(conv, bn), relu)


def fuse_linear_bn(is_qat: bool, linear: nn.Linear, bn: nn.BatchNorm1d) -> nn.Module:
    """Linear+BN1d: eval -> one folded linear; QAT -> LinearBn1d keeping the BatchNorm."""
    if is_qat:
        _check_same_mode(linear, bn)
        _check_channels(linear, linear.out_features, bn, "out_features")
        _check_trainable_bn(bn)
        return LinearBn1d(linear, bn)
    return fuse_linear_bn_eval(linear, bn)


def fuse_convtranspose_bn(is_qat: bool, convt: _ConvTransposeNd, bn: _BatchNorm) -> nn.Module:
    """ConvTranspose+BN: eval -> one folded ConvTranspose (any groups); no QAT form."""
    if is_qat:
        raise UnsupportedFusionError(
            f"Fusing {_describe(convt)} with {_describe(bn)} is not supported for QAT "
            "(is_qat=True / fuse_modules_qat): train with the unfused modules, then call "
            "model.eval() and fuse_modules to fold the BatchNorm."
        )
    return fuse_conv_bn_eval(convt, bn, transpose=True)


def _sequential_fuser(fused_class: type[FusedSequential]) -> FuserMethod:
    """A fuser method that wraps the modules in ``fused_class`` in both modes."""

    def fuse_into_sequential(is_qat: bool, *modules: nn.Module) -> nn.Module:
        return fused_class(*modules)

    fuse_into_sequential.__name__ = f"fuse_into_{fused_class.__name__}"
    return fuse_into_sequential


_DEFAULT_FUSER_METHODS: dict[tuple[type[nn.Module], ...], FuserMethod] = {
    (nn.Conv1d, nn.BatchNorm1d): fuse_conv_bn,
    (nn.Conv2d, nn.BatchNorm2d): fuse_conv_bn,
    (nn.Conv3d, nn.BatchNorm3d): fuse_conv_bn,
    (nn.Conv1d, nn.BatchNorm1d, nn.ReLU): fuse_conv_bn_relu,
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU): fuse_conv_bn_relu,
    (nn.Conv3d, nn.BatchNorm3d, nn.ReLU): fuse_conv_bn_relu,
    (nn.Conv1d, nn.ReLU): _sequential_fuser(ConvReLU1d),
    (nn.Conv2d, nn.ReLU): _sequential_fuser(ConvReLU2d),
    (nn.Conv3d, nn.ReLU): _sequential_fuser(ConvReLU3d),
    (nn.ConvTranspose1d, nn.BatchNorm1d): fuse_convtranspose_bn,
    (nn.ConvTranspose2d, nn.BatchNorm2d): fuse_convtranspose_bn,
    (nn.ConvTranspose3d, nn.BatchNorm3d): fuse_convtranspose_bn,
    (nn.Linear, nn.BatchNorm1d): fuse_linear_bn,
    (nn.Linear, nn.ReLU): _sequential_fuser(LinearReLU),
    (nn.BatchNorm1d, nn.ReLU): _sequential_fuser(BNReLU1d),
    (nn.BatchNorm2d, nn.ReLU): _sequential_fuser(BNReLU2d),
    (nn.BatchNorm3d, nn.ReLU): _sequential_fuser(BNReLU3d),
}


def _default_fuser_methods() -> dict[tuple[type[nn.Module], ...], FuserMethod]:
    """The defaults, plus torchvision's FrozenBatchNorm2d after a conv once torchvision's ops are loaded."""
    frozen = frozen_batchnorm_class()
    if frozen is None:
        return dict(_DEFAULT_FUSER_METHODS)
    return {**_DEFAULT_FUSER_METHODS, (nn.Conv2d, frozen): fuse_conv_bn, (nn.Conv2d, frozen, nn.ReLU): fuse_conv_bn_relu}


def _type_names(types: Sequence[type]) -> str:
    return "(" + ", ".join(getattr(t, "__name__", repr(t)) for t in types) + ")"


def supported_fusions(
    additional_fuser_method_mapping: dict[tuple[type[nn.Module], ...], FuserMethod] | None = None,
) -> list[tuple[type[nn.Module], ...]]:
    """The type sequences :func:`fuse_known_modules` can fuse."""
    return list({**_default_fuser_methods(), **(additional_fuser_method_mapping or {})})


def get_fuser_method(
    op_list: Sequence[type[nn.Module]],
    additional_fuser_method_mapping: dict[tuple[type[nn.Module], ...], FuserMethod] | None = None,
) -> FuserMethod:
    """Return the fuser method ``f(is_qat, *modules)`` for a sequence of module types.

    ``additional_fuser_method_mapping`` entries take precedence over the
    defaults. A subclass that keeps its parent's ``forward`` is looked up as
    the parent when the exact sequence has no entry. Raises
    :class:`UnsupportedFusionError` (a NotImplementedError) naming the types
    and listing the supported sequences.
    """
    mapping = {**_default_fuser_methods(), **(additional_fuser_method_mapping or {})}
    op_list = tuple(op_list)
    fuser_method = mapping.get(op_list)
    if fuser_method is None:
        fuser_method = mapping.get(tuple(stock_forward_base(t) or t for t in op_list))
    if fuser_method is None:
        supported = "; ".join(_type_names(key) for key in mapping)
        raise UnsupportedFusionError(
            f"Cannot fuse the module types {_type_names(op_list)}: no fuser method for this "
            f"sequence.{_overridden_forward_note(op_list)} Supported sequences: {supported}."
        )
    return fuser_method


def _overridden_forward_note(op_list: Sequence[type]) -> str:
    """Name the types that subclass a torch layer but override ``forward``, if any."""
    notes = []
    for t in op_list:
        if isinstance(t, type) and issubclass(t, (_ConvNd, nn.Linear, _BatchNorm)) and stock_forward_base(t) is None:
            parent = next((c for c in t.__mro__[1:] if c.__module__.startswith("torch.nn.")), None)
            parent_name = parent.__name__ if parent is not None else "its torch parent"
            notes.append(f" {t.__name__} subclasses {parent_name} but overrides forward, so it may compute "
                         f"something else and is never fused as a {parent_name}.")
    return "".join(notes)


# --------------------------------------------------------------------------
# Moving hooks from the original modules to the fused one
# --------------------------------------------------------------------------
HookDicts = dict[str, "OrderedDict[int, Any]"]


def _take_hooks(module: nn.Module) -> HookDicts:
    """Detach every hook dict from ``module`` (leaving it hook-free) and return them."""
    taken = {}
    for name in hook_attributes():
        taken[name] = getattr(module, name, OrderedDict())
        setattr(module, name, OrderedDict())
    return taken


def _put_back_hooks(module: nn.Module, hooks: HookDicts) -> None:
    for name, hook_dict in hooks.items():
        setattr(module, name, hook_dict)


def _warn_dropped_hooks(module: nn.Module, hooks: HookDicts, kinds: tuple[str, ...], role: str) -> None:
    for kind in kinds:
        for hook in hooks[HOOK_KINDS[kind][0]].values():
            hook_name = getattr(hook, "__qualname__", None) or repr(hook)
            warnings.warn(
                f"Fusion drops the {HOOK_LABELS[kind]} {hook_name!r} on {_describe(module)}: it is "
                f"the {role} of the fused group and disappears into the fused module. Only the "
                "first module's forward pre-hooks and the last module's forward hooks move to "
                "the fused module; register this hook on the fused module if you still need it.",
                UserWarning,
                stacklevel=stacklevel_outside_fusionlib(),
            )


def _move_hooks(fused: nn.Module, mod_list: Sequence[nn.Module], hooks: Sequence[HookDicts]) -> None:
    """First module's pre-hooks and last module's forward hooks go to ``fused``; warn for the rest."""
    attach_hook_dicts(fused, hooks[0], ("forward_pre",))
    attach_hook_dicts(fused, hooks[-1], ("forward",))
    backward = ("backward_pre", "backward")
    last = len(mod_list) - 1
    for position, (module, module_hooks) in enumerate(zip(mod_list, hooks)):
        if position == 0:
            dropped, role = ("forward", *backward), "first module"
        elif position == last:
            dropped, role = ("forward_pre", *backward), "last module"
        else:
            dropped, role = tuple(HOOK_KINDS), "middle module"
        _warn_dropped_hooks(module, module_hooks, dropped, role)


# --------------------------------------------------------------------------
# fuse_known_modules: one group of modules -> [fused, Identity, ...]
# --------------------------------------------------------------------------
def fuse_known_modules(
    mod_list: Sequence[nn.Module],
    is_qat: bool = False,
    additional_fuser_method_mapping: dict[tuple[type[nn.Module], ...], FuserMethod] | None = None,
) -> list[nn.Module]:
    """Fuse a sequence of modules; return ``[fused, Identity(), ...]`` of the same length.

    Supported sequences (see :func:`supported_fusions`): Conv+BN, Conv+BN+ReLU,
    Conv+ReLU (1d/2d/3d), ConvTranspose+BN (1d/2d/3d), Linear+BN1d,
    Linear+ReLU, BN+ReLU (1d/2d/3d). ``is_qat=False`` folds BatchNorm (eval
    mode required); ``is_qat=True`` keeps it in a trainable container.

    The first module's forward pre-hooks and the last module's forward hooks
    move to the fused module (each runs once per forward); other hooks on the
    modules are dropped with a UserWarning. The Identity modules copy the
    first module's ``training`` flag. On error the modules are left as they were.
    """
    mod_list = list(mod_list)
    types = tuple(type_before_parametrizations(m) for m in mod_list)
    fuser_method = get_fuser_method(types, additional_fuser_method_mapping)
    hooks = [_take_hooks(m) for m in mod_list]  # so copies made by the fuser carry none
    try:
        fused = fuser_method(is_qat, *mod_list)
    except BaseException:
        for module, module_hooks in zip(mod_list, hooks):
            _put_back_hooks(module, module_hooks)
        raise
    _move_hooks(fused, mod_list, hooks)
    identities = []
    for _ in mod_list[1:]:
        identity = nn.Identity()
        identity.training = mod_list[0].training
        identities.append(identity)
    return [fused, *identities]


# --------------------------------------------------------------------------
# fuse_modules: names -> groups -> fused model
# --------------------------------------------------------------------------
ModulesToFuse = Sequence[str | int] | Sequence[Sequence[str | int]]


def _normalize_groups(modules_to_fuse: ModulesToFuse) -> list[list[str]]:
    """One list of names, or a list of lists -> list of groups of dotted names (ints -> str)."""
    if isinstance(modules_to_fuse, (str, int)) or not isinstance(modules_to_fuse, Sequence):
        raise FusionError(
            "modules_to_fuse must be a list of module names (['conv', 'bn']) or a list of such "
            f"lists, got {modules_to_fuse!r}."
        )
    items = list(modules_to_fuse)
    is_name = lambda x: isinstance(x, (str, int)) and not isinstance(x, bool)  # noqa: E731
    if all(is_name(x) for x in items):
        groups = [items] if items else []
    elif all(isinstance(x, Sequence) and not isinstance(x, str) for x in items):
        groups = [list(group) for group in items]
    else:
        raise FusionError(
            "modules_to_fuse must be either one list of names or a list of lists of names, "
            f"not a mix: {modules_to_fuse!r}."
        )
    for group in groups:
        if not group or not all(is_name(x) for x in group):
            raise FusionError(f"Each group must be a non-empty list of names, got {group!r}.")
    return [[str(name) for name in group] for group in groups]


def _get_module(model: nn.Module, name: str, known_names: list[str]) -> nn.Module:
    """Submodule by dotted name ("layer1.0.conv1", or "0" in a Sequential)."""
    if name:
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    close = difflib.get_close_matches(name, known_names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise FusionError(f"{type(model).__name__} has no submodule named {name!r}.{hint}")


def _resolve_groups(model: nn.Module, groups: list[list[str]]) -> list[list[nn.Module]]:
    """Look up every name; reject a module listed twice (by name or by alias)."""
    known_names = [name for name, _ in model.named_modules() if name]
    seen: dict[int, str] = {}
    resolved = []
    for group in groups:
        modules = []
        for name in group:
            module = _get_module(model, name, known_names)
            if id(module) in seen:
                first = seen[id(module)]
                same = "is listed twice" if first == name else f"is the same module as {first!r}"
                raise FusionError(
                    f"{name!r} {same}: a module can be fused only once (groups: {groups})."
                )
            seen[id(module)] = name
            modules.append(module)
        resolved.append(modules)
    return resolved


def _additional_mapping(fuse_custom_config_dict: dict[str, Any] | None) -> dict:
    config = dict(fuse_custom_config_dict or {})
    unknown = set(config) - {"additional_fuser_method_mapping"}
    if unknown:
        raise FusionError(
            f"Unknown fuse_custom_config_dict keys {sorted(unknown)}; the supported key is "
            "'additional_fuser_method_mapping'."
        )
    return dict(config.get("additional_fuser_method_mapping") or {})


class _ModuleTreeSnapshot:
    """A shallow record of every module in a tree, to undo a failed fusion.

    It keeps, per module, its attribute values and the contents of its dicts
    and sets (children, parameters, buffers, hooks, training flag) - all that
    fusion changes - and restores them into the same objects, so existing hook
    handles stay valid. Tensor data is not copied: a custom fuser that edits
    weight values in place is not undone.
    """

    def __init__(self, model: nn.Module) -> None:
        self._saved = [(module, self._record(module)) for module in model.modules()]

    @staticmethod
    def _record(module: nn.Module) -> dict[str, tuple[Any, Any]]:
        record = {}
        for key, value in vars(module).items():
            contents = dict(value) if isinstance(value, dict) else set(value) if isinstance(value, set) else None
            record[key] = (value, contents)
        return record

    def restore(self) -> None:
        for module, record in self._saved:
            attributes = vars(module)
            for key in [k for k in attributes if k not in record]:
                del attributes[key]
            for key, (value, contents) in record.items():
                if contents is not None:
                    value.clear()
                    value.update(contents)
                attributes[key] = value


def _fuse_modules(
    model: nn.Module,
    modules_to_fuse: ModulesToFuse,
    is_qat: bool,
    inplace: bool,
    fuser_func: Callable[..., list[nn.Module]],
    fuse_custom_config_dict: dict[str, Any] | None,
) -> nn.Module:
    groups = _normalize_groups(modules_to_fuse)
    additional = _additional_mapping(fuse_custom_config_dict)
    # Validate on the caller's model before anything is copied or changed.
    resolved = _resolve_groups(model, groups)
    if fuser_func is fuse_known_modules:
        for group, modules in zip(groups, resolved):
            try:
                get_fuser_method(tuple(type_before_parametrizations(m) for m in modules), additional)
            except UnsupportedFusionError as error:
                raise UnsupportedFusionError(f"Group {group}: {error}") from None
    if not inplace:
        model = copy.deepcopy(model)
        resolved = _resolve_groups(model, groups)
    names = {id(m): name for group, modules in zip(groups, resolved) for name, m in zip(group, modules)}
    snapshot = _ModuleTreeSnapshot(model)
    token = _MODULE_NAMES.set(names)
    try:
        for group, modules in zip(groups, resolved):
            fused = list(fuser_func(modules, is_qat, additional))
            if len(fused) != len(group):
                raise FusionError(
                    f"fuser_func returned {len(fused)} modules for the {len(group)} names {group}."
                )
            for name, module in zip(group, fused):
                set_submodule(model, name, module)
    except BaseException:
        snapshot.restore()
        raise
    finally:
        _MODULE_NAMES.reset(token)
    return model


def fuse_modules(
    model: nn.Module,
    modules_to_fuse: ModulesToFuse,
    inplace: bool = False,
    fuser_func: Callable[..., list[nn.Module]] = fuse_known_modules,
    fuse_custom_config_dict: dict[str, Any] | None = None,
) -> nn.Module:
    """Fuse groups of modules for inference (BatchNorm folded; model in eval mode).

    ``modules_to_fuse``: one list of dotted names (``["conv1", "bn1", "relu"]``)
    or a list of such lists (``[["layer1.0.conv1", "layer1.0.bn1"], ...]``);
    inside an ``nn.Sequential`` names are indices (``["0", "1"]`` or ``[0, 1]``).
    In each group the first module becomes the fused module (see
    :func:`fuse_known_modules`), the rest ``nn.Identity``.

    ``inplace=False`` (default) returns a fused deep copy and never touches
    ``model``. ``inplace=True`` checks every name and type sequence before
    changing anything, and restores the model if a fuser fails halfway.
    ``fuser_func(mod_list, is_qat, additional_fuser_method_mapping)`` replaces
    the default fuser; ``fuse_custom_config_dict={"additional_fuser_method_mapping":
    {(Conv2d, ReLU6): fuser}}`` adds fuser methods ``f(is_qat, *modules)``.
    """
    return _fuse_modules(model, modules_to_fuse, False, inplace, fuser_func, fuse_custom_config_dict)


def fuse_modules_qat(
    model: nn.Module,
    modules_to_fuse: ModulesToFuse,
    inplace: bool = False,
    fuser_func: Callable[..., list[nn.Module]] = fuse_known_modules,
    fuse_custom_config_dict: dict[str, Any] | None = None,
) -> nn.Module:
    """:func:`fuse_modules` for training (``is_qat=True``): Conv+BN(+ReLU) and
    Linear+BN become ConvBnNd / ConvBnReLUNd / LinearBn1d containers whose
    BatchNorm keeps training; nothing is folded."""
    return _fuse_modules(model, modules_to_fuse, True, inplace, fuser_func, fuse_custom_config_dict)
