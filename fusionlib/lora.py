r"""LoRA adapters: a low-rank update on a frozen layer, fused into its weight for inference (notebook 13).

LoRA (Hu et al., 2021) fine-tunes a layer ``y = W x + b`` without touching
``W``: it learns two small matrices ``A`` (``[r, in]``) and ``B`` (``[out, r]``)
and computes::

    y = W x + b + s · B A x            s = alpha / r   (``scaling``, the loralib / PEFT convention)

``B`` starts at zero, so training starts from the frozen layer exactly; ``A``
starts random (Kaiming-uniform, as in loralib and PEFT). Dropout, when used,
acts on the adapter's input only: ``s · B A dropout(x)``. ``r · (in + out)``
trainable numbers stand in for the ``in · out`` of ``W``.

**Fusing.** ``B A`` is an ``[out, in]`` matrix, so the update folds into the
weight once training is over::

    W' = W + λ · s · B A            λ = ``lora_scale`` (1 by default; diffusers' name)

and ``W' x + b`` is what the adapted layer computes (for λ = 1), at the cost of
the plain layer. Precision, as :func:`fusionlib.folding.fuse_conv_bn_weights`:
``B A``, the scaling and the sum are computed in float64 and rounded once to
the weight's dtype (and memory format).

**Convolutions** (:class:`LoRAConv2d`, ``groups = 1``). ``A`` is a kxk
convolution from ``C_in`` to ``r`` channels with the base conv's stride,
padding and dilation (weight ``[r, C_in, k, k]``), ``B`` a 1x1 convolution from
``r`` to ``C_out`` channels (weight ``[C_out, r, 1, 1]``). A 1x1 conv with stride
1 mixes channels pixel by pixel, so::

    (B ⊛ (A ⋆ x))[o] = Σ_j B[o, j] Σ_i (A[j, i] ⋆ x_i) = Σ_i (Σ_j B[o, j] A[j, i]) ⋆ x_i

which is one kxk convolution of ``x`` (same stride, padding, dilation) with the
kernel ``(B ⊗ A)[o, i, u, v] = Σ_j B[o, j, 0, 0] · A[j, i, u, v]``: the matrix
product ``B.reshape(C_out, r) @ A.reshape(r, C_in·k·k)`` reshaped to
``[C_out, C_in, k, k]``. Hence::

    W' = W + λ · s · (B ⊗ A)

A grouped or depthwise conv has no dense ``[C_out, C_in]`` weight for ``B A`` to
update; adapters go on the dense layers around it (MobileNetV2: the pointwise
convs and the classifier), and :func:`inject_lora` says so, naming the module.

**Unfusing.** Rounding ``W + ΔW`` to fp32 loses low bits of ``W``, so
subtracting ``ΔW`` again would not give ``W`` back exactly. A fused layer keeps
its original weight (a buffer ``weight_unfused``, one extra copy of the
adapted weights while fused, None otherwise) and :meth:`LoRALayer.unmerge` copies it
back, bit for bit. Fusing always starts from that original, so fusing twice
never adds the update twice, and fusing with a new ``lora_scale`` replaces the
old one. Changes made to a fused layer's ``base.weight`` are discarded by
unfusing.

**Saving.** A fused layer's ``state_dict`` holds the merged weight
(``base.weight``), the original (``weight_unfused``) and its ``λ``
(``merged_scale``); an unfused layer's holds neither of the last two. Loading
unfuses the layer first, then takes the state as it was saved: a fused state
comes back fused (and unfuses bit for bit), an unfused one unfused, whatever
the layer was before. :func:`lora_state_dict` saves the adapters alone;
:func:`merge_and_unload` gives the plain model to deploy.

**Hooks.** Forward pre-hooks and forward hooks follow the layer's name
(:func:`fusionlib.modules.carry_forward_hooks`): :func:`inject_lora` moves them
from the layer to its wrapper, :func:`merge_and_unload` back to the plain
layer, so a hook on ``"fc"`` always sees what ``fc`` computes, adapter included.

Public names: :class:`LoRALinear`, :class:`LoRAConv2d` (the layers; both are
:class:`LoRALayer`), :func:`lora_delta` and :func:`merge_lora_weight` (the
arithmetic), :func:`inject_lora`, :func:`fuse_lora`, :func:`unfuse_lora`,
:func:`merge_and_unload` (whole models), :func:`lora_layers`,
:func:`dense_layer_names`, :func:`mark_only_lora_as_trainable`,
:func:`lora_state_dict`, :func:`count_lora_parameters`, and for the notebook's
shifted task :func:`shifted_digits_tensors` and :func:`fine_tune_lora`
(fine-tuned adapters, cached on disk: ``zoo.trained_model(name, "lora", ...)``).
"""
from __future__ import annotations

import copy
import difflib
import math
import numbers
import time
import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionlib.arguments import check_positive_int
from fusionlib.folding import round_to_nearest
from fusionlib.models import _check_dropout
from fusionlib.modules import carry_forward_hooks

__all__ = [
    "LoRALayer",
    "LoRALinear",
    "LoRAConv2d",
    "lora_delta",
    "merge_lora_weight",
    "inject_lora",
    "fuse_lora",
    "unfuse_lora",
    "merge_and_unload",
    "lora_layers",
    "dense_layer_names",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "count_lora_parameters",
    "SHIFTS",
    "shifted_digits_tensors",
    "fine_tune_lora",
]

_EXACT = torch.float64  # the dtype B @ A, the scaling and the sum are computed in


# --------------------------------------------------------------------------
# Argument checks (each error names the bad value and says what would work)
# --------------------------------------------------------------------------
def _real(value: Any) -> float | None:
    """``float(value)`` for a finite real number (int, float, numpy scalar, 0-d real tensor; not bool), else None."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not (value.dtype.is_complex or value.dtype == torch.bool):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def _check_lora_alpha(alpha: Any) -> float:
    """``alpha`` as a float; ``ValueError`` unless it is a positive finite real number."""
    value = _real(alpha)
    if value is None or value <= 0:
        raise ValueError(
            f"alpha must be a positive finite number, got {alpha!r}; the update is scaled by alpha / r "
            "(alpha = r gives scaling 1, alpha = 2r is a common choice)"
        )
    return value


def _check_lora_scale(lora_scale: Any) -> float:
    """``lora_scale`` as a float; ``ValueError`` unless it is a finite real number."""
    value = _real(lora_scale)
    if value is None:
        raise ValueError(f"lora_scale must be a finite number (1.0 fuses the update as trained), got {lora_scale!r}")
    return value


# --------------------------------------------------------------------------
# The arithmetic: tensors in, tensors out
# --------------------------------------------------------------------------
def lora_delta(
    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, lora_scale: float = 1.0
) -> torch.Tensor:
    r"""The weight update ``ΔW = λ · s · B A`` in float64 (not rounded), shaped like the base weight.

    Linear: ``A`` is ``[r, in]``, ``B`` is ``[out, r]``, ``ΔW`` is ``[out, in]``.
    Conv2d: ``A`` is ``[r, C_in, kh, kw]``, ``B`` is ``[C_out, r, 1, 1]`` and
    ``ΔW[o, i, u, v] = λ · s · Σ_j B[o, j, 0, 0] · A[j, i, u, v]`` (``B ⊗ A``), i.e.
    ``B.reshape(C_out, r) @ A.reshape(r, -1)`` reshaped to ``[C_out, C_in, kh, kw]``.
    """
    r = lora_A.shape[0]
    if lora_B.dim() < 2 or lora_B.shape[1] != r or any(size != 1 for size in lora_B.shape[2:]):
        raise ValueError(
            f"lora_B of shape {tuple(lora_B.shape)} does not fit lora_A of shape {tuple(lora_A.shape)}: "
            f"lora_B must be [out, r] (or [out, r, 1, 1] for a conv) with r = lora_A.shape[0] = {r}"
        )
    with torch.no_grad():
        a = lora_A.detach().to(_EXACT).reshape(r, -1)
        b = lora_B.detach().to(_EXACT).reshape(lora_B.shape[0], r)
        delta = (b @ a) * (float(lora_scale) * float(scaling))
    return delta.reshape(lora_B.shape[0], *lora_A.shape[1:])


def merge_lora_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    lora_scale: float = 1.0,
) -> torch.Tensor:
    r"""``W' = W + λ · s · B A`` (conv: ``W + λ · s · (B ⊗ A)``), in float64, rounded once to ``weight``'s dtype.

    Returns a new tensor laid out like ``weight`` (same dtype, strides, hence
    memory format); ``weight`` is not modified. See :func:`lora_delta`.
    """
    delta = lora_delta(lora_A, lora_B, scaling, lora_scale)
    if delta.shape != weight.shape:
        raise ValueError(
            f"the update B A has shape {tuple(delta.shape)} but the weight has shape {tuple(weight.shape)}; "
            "lora_A must be [r, in...] and lora_B [out, r...] for this weight"
        )
    with torch.no_grad():
        exact = weight.detach().to(_EXACT) + delta
        return torch.empty_like(weight.detach()).copy_(round_to_nearest(exact, weight.dtype))


# --------------------------------------------------------------------------
# The layers
# --------------------------------------------------------------------------
class LoRALayer(nn.Module):
    r"""What :class:`LoRALinear` and :class:`LoRAConv2d` share: ``.base`` (frozen), ``lora_A``, ``lora_B``,
    ``scaling = alpha / r``, dropout, and :meth:`merge` / :meth:`unmerge`.

    Unfused: ``forward(x) = base(x) + scaling · B(A(dropout(x)))``. Fused:
    ``forward(x) = base(x)`` with ``base.weight = W + lora_scale · scaling · B A``.
    """

    base: nn.Module
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    weight_unfused: torch.Tensor | None
    merged_scale: torch.Tensor | None

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        check_positive_int("r (the adapter's rank)", r, "typical values are 1 to 64")
        alpha = _check_lora_alpha(alpha)
        _check_dropout(dropout)
        self.base = base
        self.r, self.alpha, self.dropout_p = r, alpha, float(dropout)
        self.scaling = alpha / r
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # requires_grad the base had, restored by merge_and_unload; then freeze it
        self._base_requires_grad = {name: p.requires_grad for name, p in base.named_parameters(recurse=False)}
        for p in base.parameters(recurse=False):
            p.requires_grad_(False)
        # while fused: the original W and the λ of the update (saved in the state_dict), else None
        self.register_buffer("weight_unfused", None)
        self.register_buffer("merged_scale", None)

    def reset_lora_parameters(self) -> None:
        """``A``: Kaiming-uniform (a = √5, as ``nn.Linear`` and loralib / PEFT); ``B``: zeros, so the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def merged(self) -> bool:
        """True while the update is fused into ``base.weight``."""
        return self.weight_unfused is not None

    @property
    def lora_scale(self) -> float | None:
        """The λ of the fused update; None while unfused."""
        return None if self.merged_scale is None else float(self.merged_scale)

    def delta_weight(self, lora_scale: float = 1.0) -> torch.Tensor:
        """``λ · s · B A`` in float64, shaped like ``base.weight`` (:func:`lora_delta`)."""
        return lora_delta(self.lora_A, self.lora_B, self.scaling, lora_scale)

    def merge(self, lora_scale: float = 1.0) -> "LoRALayer":
        """Fuse ``W' = W + λ · s · B A`` into ``base.weight`` (in place), keeping ``W`` for :meth:`unmerge`.

        Always computed from the original ``W``: merging again recomputes the
        same ``W'`` (or the one for a new ``lora_scale``), never adds twice.
        """
        lora_scale = _check_lora_scale(lora_scale)
        original = self.weight_unfused if self.merged else self.base.weight.detach().clone()
        fused = merge_lora_weight(original, self.lora_A, self.lora_B, self.scaling, lora_scale)
        with torch.no_grad():
            self.base.weight.copy_(fused)
        self.weight_unfused = original
        self.merged_scale = torch.tensor(lora_scale, dtype=torch.float64, device=original.device)
        return self

    def unmerge(self) -> "LoRALayer":
        """Copy the original ``W`` back into ``base.weight`` (bit for bit); unfused layers are left as they are."""
        if self.merged:
            with torch.no_grad():
                self.base.weight.copy_(self.weight_unfused)
            self.weight_unfused = None
            self.merged_scale = None
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Unfuse first, then load the state as saved: fused (it holds ``weight_unfused``) or not."""
        self.unmerge()
        if prefix + "weight_unfused" in state_dict:  # room for the saved original W and λ, loaded by torch
            self.weight_unfused = torch.empty_like(self.base.weight.detach())
            self.merged_scale = torch.full((), math.nan, dtype=torch.float64, device=self.base.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - defined by the subclasses
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + self.scaling * self.lora_forward(self.dropout(x))

    def extra_repr(self) -> str:
        state = f"fused, lora_scale={self.lora_scale:g}" if self.merged else "unfused"
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout_p:g}, {state}"


class LoRALinear(LoRALayer):
    r"""An ``nn.Linear`` with a LoRA adapter: ``y = W x + b + (alpha / r) · B A dropout(x)``.

    ``lora_A``: ``[r, in_features]`` (Kaiming-uniform), ``lora_B``:
    ``[out_features, r]`` (zeros). ``base`` is the wrapped ``nn.Linear``, its
    parameters frozen. Fused: ``W' = W + λ · (alpha / r) · B A``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}; use LoRAConv2d for nn.Conv2d")
        super().__init__(base, r, alpha, dropout)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, dtype=w.dtype, device=w.device))
        self.reset_lora_parameters()

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` as two thin matmuls: ``x -> [.., r] -> [.., out]``."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


def _conv_problem(conv: nn.Conv2d) -> str | None:
    """Why a LoRA adapter cannot go on ``conv`` (grouped / depthwise, or non-zero padding mode), else None."""
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        return (f"needs a dense conv (groups=1), got a {kind} conv with groups={conv.groups} "
                f"({conv.in_channels} -> {conv.out_channels} channels): it has no dense [out, in] weight for B A "
                "to update. Put adapters on the dense layers around it (MobileNetV2: the pointwise 1x1 convs "
                "and the classifier; lora.dense_layer_names(model) lists them)")
    if conv.padding_mode != "zeros":
        return f"supports padding_mode='zeros' only, got {conv.padding_mode!r}"
    return None


class LoRAConv2d(LoRALayer):
    r"""An ``nn.Conv2d`` (``groups = 1``) with a LoRA adapter: ``y = W ⋆ x + b + (alpha / r) · B ⊛ (A ⋆ dropout(x))``.

    ``lora_A``: ``[r, C_in, kh, kw]``, a conv to ``r`` channels with the base
    conv's stride, padding and dilation (Kaiming-uniform); ``lora_B``:
    ``[C_out, r, 1, 1]``, a 1x1 conv (zeros). Fused:
    ``W' = W + λ · (alpha / r) · (B ⊗ A)`` (derivation in the module docstring).
    A grouped or depthwise conv raises ``ValueError``; so does a
    ``padding_mode`` other than ``'zeros'``.
    """

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, dropout: float = 0.0) -> None:
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps an nn.Conv2d, got {type(base).__name__}; use LoRALinear for nn.Linear")
        problem = _conv_problem(base)
        if problem:
            raise ValueError(f"LoRAConv2d {problem}")
        super().__init__(base, r, alpha, dropout)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_channels, *base.kernel_size, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(base.out_channels, r, 1, 1, dtype=w.dtype, device=w.device))
        self.reset_lora_parameters()

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B ⊛ (A ⋆ x)``: A with the base conv's stride / padding / dilation, then the 1x1 conv B."""
        base = self.base
        hidden = F.conv2d(x, self.lora_A, None, base.stride, base.padding, base.dilation)
        return F.conv2d(hidden, self.lora_B)


_WRAPPERS: dict[type, type[LoRALayer]] = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


# --------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every :class:`LoRALayer` of ``model``, by dotted name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def dense_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers an adapter fits: every ``nn.Linear`` and every ``nn.Conv2d`` with ``groups=1``.

    Modules already inside a LoRA layer are left out. ResNet18: every conv and
    ``fc``; MobileNetV2: the stem conv, the pointwise 1x1 convs and the
    classifier (its depthwise convs are grouped).
    """
    inside = _names_inside_lora(model)
    return [name for name, m in model.named_modules()
            if name not in inside and not isinstance(m, LoRALayer)
            and (type(m) is nn.Linear or (type(m) is nn.Conv2d and m.groups == 1))]


def _names_inside_lora(model: nn.Module) -> set[str]:
    inside = set()
    for name, layer in lora_layers(model).items():
        inside.update(f"{name}.{sub}" if sub else name for sub, _ in layer.named_modules())
    return inside


def _wrapper_for(name: str, module: nn.Module) -> type[LoRALayer]:
    for kind, wrapper in _WRAPPERS.items():
        if type(module) is kind:
            return wrapper
    raise TypeError(
        f"cannot put a LoRA adapter on '{name}' ({type(module).__name__}): supported layers are "
        f"{', '.join(k.__name__ for k in _WRAPPERS)} (exact types)"
    )


def _resolve_targets(model: nn.Module, target_modules: Any) -> list[str]:
    """Dotted names (str) and module types -> the names to wrap, in module order; errors name what is wrong."""
    items = [target_modules] if isinstance(target_modules, (str, type)) else list(target_modules or [])
    if not items:
        raise ValueError("target_modules is empty: give dotted module names (e.g. 'fc', 'layer1.0.conv1') "
                         "or module types (nn.Linear, nn.Conv2d)")
    modules = dict(model.named_modules())  # each module under its first name
    names_of: dict[int, list[str]] = {}  # every name of each module, aliases included
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
    aliases = {alias: names[0] for names in names_of.values() for alias in names[1:]}
    inside = _names_inside_lora(model)
    names: list[str] = []
    for item in items:
        if isinstance(item, type):
            if item not in _WRAPPERS:
                raise TypeError(
                    f"target type {item.__name__} is not supported: LoRA adapters fit "
                    f"{', '.join(k.__name__ for k in _WRAPPERS)}"
                )
            found = [n for n, m in modules.items() if type(m) is item and n not in inside]
            if not found:
                raise ValueError(f"target type {item.__name__} matches no module of {type(model).__name__} "
                                 "(outside existing LoRA layers)")
            names += found
        elif isinstance(item, str):
            item = aliases.get(item, item)  # an alias is refused below, with all its names
            if item not in modules or item == "":
                close = difflib.get_close_matches(item, [n for n in modules if n], n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise KeyError(f"target module {item!r} does not exist in {type(model).__name__}{hint}")
            if isinstance(modules[item], LoRALayer) or item in inside:
                raise ValueError(f"'{item}' already has a LoRA adapter (or is inside one); inject once per layer")
            names.append(item)
        else:
            raise TypeError(f"target_modules entries are dotted names (str) or module types, got {item!r}")
    for name in names:
        shared = names_of[id(modules[name])]
        if len(shared) > 1:
            raise ValueError(
                f"'{name}' is one module under several names ({', '.join(map(repr, shared))}): an adapter on one "
                "name would also change the other uses once fused. Give each use its own layer (copy.deepcopy) "
                "before inject_lora, or leave it without an adapter.")
    order = {n: i for i, n in enumerate(modules)}
    return sorted(dict.fromkeys(names), key=order.__getitem__)


def inject_lora(
    model: nn.Module,
    target_modules: str | type | Sequence[str | type],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    inplace: bool = False,
) -> nn.Module:
    r"""Wrap the target layers of ``model`` in :class:`LoRALinear` / :class:`LoRAConv2d`; return the model.

    ``target_modules``: dotted names (``"fc"``, ``"layer1.0.conv1"``), module
    types (``nn.Linear``, ``nn.Conv2d``: every module of exactly that type), or a
    list mixing both. Each wrapper sits under the layer's name, so the layer's
    own weight becomes ``<name>.base.weight`` (frozen) and ``<name>.lora_A`` /
    ``<name>.lora_B`` are new. Only the wrapped layers' weights are frozen; see
    :func:`mark_only_lora_as_trainable` to train adapters alone.

    Every target is checked before anything changes: an unknown name (named,
    with close matches), an unsupported type, a grouped / depthwise conv (named)
    or a layer that already has an adapter raise, and leave ``model`` as it was.
    ``inplace=False`` (default) works on a deep copy; ``inplace=True`` on
    ``model`` itself.
    """
    check_positive_int("r (the adapter's rank)", r, "typical values are 1 to 64")
    alpha = _check_lora_alpha(alpha)
    _check_dropout(dropout)
    names = _resolve_targets(model, target_modules)
    wrappers = {}
    for name in names:  # decide everything first ...
        module = model.get_submodule(name)
        wrappers[name] = _wrapper_for(name, module)
        problem = _conv_problem(module) if wrappers[name] is LoRAConv2d else None
        if problem:
            raise ValueError(f"cannot put a LoRA adapter on '{name}': LoRAConv2d {problem}")
    target = model if inplace else copy.deepcopy(model)
    for name, wrapper in wrappers.items():  # ... then rewrite
        base = target.get_submodule(name)
        layer = wrapper(base, r, alpha, dropout)
        _move_forward_hooks(base, layer, name)
        target = _replace(target, name, layer)
    return target


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """``model.<name> = new``; the model itself is replaced when ``name`` is "" (the root). Returns the model."""
    if not name:
        return new
    model.set_submodule(name, new)
    return model


def _move_forward_hooks(base: nn.Module, wrapper: nn.Module, name: str) -> None:
    """The hook policy for a layer that lives on inside its wrapper: the wrapper takes the layer's forward
    pre-hooks and forward hooks (:func:`fusionlib.modules.carry_forward_hooks`). Its backward hooks stay on
    the layer, which still runs, so they are not dropped and carry's warning saying so is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The backward", category=UserWarning)
        carry_forward_hooks(base, wrapper, name)


def _require_lora(model: nn.Module, what: str) -> dict[str, LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no LoRA layers; call lora.inject_lora(model, ...) first")
    return layers


def fuse_lora(model: nn.Module, lora_scale: float = 1.0) -> nn.Module:
    r"""Fuse every adapter into its base weight, in place: ``W' = W + lora_scale · (alpha / r) · B A``; return ``model``.

    Idempotent: each layer computes ``W'`` from its original ``W`` (kept for
    :func:`unfuse_lora`), so fusing twice gives the same weights, and fusing
    with another ``lora_scale`` replaces the previous update. A model without
    LoRA layers raises ``ValueError``.
    """
    lora_scale = _check_lora_scale(lora_scale)
    for layer in _require_lora(model, "fuse_lora").values():
        layer.merge(lora_scale)
    return model


def unfuse_lora(model: nn.Module) -> nn.Module:
    r"""Restore every fused layer's original weight exactly (a bit-for-bit copy), in place; return ``model``.

    Layers that are not fused are left as they are, so unfusing a model that
    was never fused is a harmless no-op. A model without LoRA layers raises
    ``ValueError``.
    """
    for layer in _require_lora(model, "unfuse_lora").values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, lora_scale: float | None = None, *, inplace: bool = False) -> nn.Module:
    r"""A plain model: each LoRA layer replaced by its base layer with the fused weight ``W + λ · (alpha / r) · B A``.

    ``lora_scale=None`` (default): a fused layer keeps the weight it has (its
    own λ, as PEFT keeps merged weights), an unfused one is fused with λ = 1.
    A number: every layer is fused with that λ, from its original weight.

    The result has no LoRA modules and the architecture the model had before
    :func:`inject_lora`; each base parameter gets back the ``requires_grad`` it
    had then, and each base layer the forward hooks of its wrapper.
    ``inplace=False`` (default) never touches ``model`` (a fused model stays
    fused, an unfused one unfused); ``inplace=True`` unwraps ``model`` itself.
    """
    if lora_scale is not None:
        lora_scale = _check_lora_scale(lora_scale)
    _require_lora(model, "merge_and_unload")
    target = model if inplace else copy.deepcopy(model)
    for name, layer in lora_layers(target).items():
        if lora_scale is not None or not layer.merged:
            layer.merge(1.0 if lora_scale is None else lora_scale)
        base = layer.base
        for pname, p in base.named_parameters(recurse=False):
            p.requires_grad_(layer._base_requires_grad.get(pname, True))
        carry_forward_hooks(layer, base, name)
        target = _replace(target, name, base)
    return target


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """``requires_grad`` True for every ``lora_A`` / ``lora_B``, False for every other parameter; return ``model``."""
    lora_params = {id(p) for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_params)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: ``{"<layer>.lora_A": ..., "<layer>.lora_B": ...}`` (detached clones)."""
    return {f"{name}.{which}" if name else which: getattr(layer, which).detach().clone()
            for name, layer in lora_layers(model).items() for which in ("lora_A", "lora_B")}


def count_lora_parameters(model: nn.Module) -> tuple[int, int]:
    """``(adapter parameters, parameters of the layers they adapt)``: ``Σ r·(in·k·k + out)`` and ``Σ in·k·k·out``."""
    layers = lora_layers(model).values()
    return (sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers),
            sum(layer.base.weight.numel() for layer in layers))


# --------------------------------------------------------------------------
# The notebook's shifted task and cached fine-tuned adapters
# --------------------------------------------------------------------------
#: Shifted versions of the digits (pixel values in [0, 1] before normalization).
SHIFTS = {
    "invert": "white digits on black become black on white: x -> 1 - x",
    "rotate": "every digit turned by 90 degrees (counter-clockwise)",
}


def shifted_digits_tensors(
    shift: str = "invert", image_size: int = 32, seed: int = 0, test_fraction: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits with a shift applied (:data:`SHIFTS`), normalized like the original task.

    Same split as :func:`fusionlib.data.digits_tensors` (3 channels); the shift
    acts on the [0, 1] pixels, then both splits are standardized with the
    *original* train split's mean and std, as a deployed model's fixed input
    pipeline would.
    """
    from fusionlib import data

    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose one of {sorted(SHIFTS)}")
    x_train, y_train, x_test, y_test = data.digits_tensors(image_size, 3, False, test_fraction, seed)
    mean, std = x_train.mean(), x_train.std()

    def apply(x: torch.Tensor) -> torch.Tensor:
        x = 1.0 - x if shift == "invert" else torch.rot90(x, 1, dims=(2, 3))
        return ((x - mean) / std).contiguous()

    return apply(x_train), y_train, apply(x_test), y_test


def fine_tune_lora(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> list[dict[str, float]]:
    """Train only the adapters of ``model`` (Adam, cosine schedule), with every other module in eval mode.

    BatchNorm keeps its running statistics (it runs in eval mode) and every
    non-LoRA parameter is frozen, so the base model is exactly the one
    fine-tuning started from; only ``lora_A`` / ``lora_B`` change (and the
    adapters' dropout is active). Returns one row per epoch: ``epoch``,
    ``train_loss``, ``seconds``.
    """
    from fusionlib.train import seed_everything

    check_positive_int("epochs", epochs)
    layers = _require_lora(model, "fine_tune_lora")
    mark_only_lora_as_trainable(model)
    params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(x_train) / batch_size)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.eval()
    for layer in layers.values():
        layer.dropout.train()
    history = []
    for epoch in range(1, epochs + 1):
        start, total, seen = time.perf_counter(), 0.0, 0
        for batch in torch.randperm(len(x_train), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        history.append({"epoch": epoch, "train_loss": total / seen, "seconds": time.perf_counter() - start})
    model.eval()
    return history
