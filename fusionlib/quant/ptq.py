r"""Post-training quantization: calibrate every quantizer, measure per-layer sensitivity, convert a built model (notebooks 08-09).

A model whose layers are quant modules (built under
:func:`fusionlib.quant.initialize`, or converted with :func:`quantize_model`)
has one :class:`~fusionlib.quant.TensorQuantizer` per quantized tensor. PTQ
picks each quantizer's ``amax`` from data, with no training::

    for every quantizer:  calibration on, quantization off    (the model computes in float)
    for batch in batches: model(batch)                        (each quantizer's calibrator collects |x|)
    for every quantizer:  amax = calibrator's choice; calibration off, quantization back on

That is :func:`calibrate`. :func:`calibrate_weights` is the data-free
half: every weight quantizer from its weight alone (``"max"``,
``"percentile"`` or ``"mse"``, per channel or per tensor), as
pytorch-quantization's ``calibrate_weights``. Which calibrator decides ``amax``:

* ``method="max"`` — every quantizer uses a :class:`~fusionlib.quant.MaxCalibrator`
  (``amax = max |x|``, per channel where the quantizer has an ``axis``).
* ``method="percentile" | "mse" | "entropy"`` — the activation quantizers
  (every quantizer but a quant layer's ``weight_quantizer``) use a
  :class:`~fusionlib.quant.HistogramCalibrator` and that method (``**kwargs``
  go to its ``compute_amax``: ``percentile=``, ``start_bin=``, ``stride=``).
  Weight quantizers keep max calibration, per tensor or per channel: a weight
  is known exactly, so there is no sampling tail to clip. (An activation
  quantizer with an ``axis`` also stays on max: a histogram is per tensor.)

**How the descriptor's ``calib_method`` interacts.** A quantizer's descriptor
only chooses the calibrator it is *built* with (used when you drive a
quantizer by hand: ``enable_calib()`` ... ``load_calib_amax()``).
:func:`calibrate` installs the calibrator its ``method`` needs on every
quantizer, so ``method`` wins. The calibrators stay installed with their
statistics afterwards: plot a quantizer's histogram, or recompute every amax
with another histogram method from the same statistics with
:func:`load_calib_amax` (no second pass over the data).

:func:`calibrate` runs the model in eval mode under ``torch.no_grad()``,
calibrates only quantizers that are enabled (a disabled one stays float and
keeps its amax), restores every quantizer's quant / calib switches, and sets
no amax unless every quantizer could get one (a quantizer that saw no data,
because its layer is not called by ``forward``, is an error naming it).

:func:`layer_sensitivity` quantizes one layer at a time (all others float)
and reports the metric's drop against the float model, largest first — the
layers to keep in float (:func:`keep_float`) when PTQ loses accuracy.

:func:`quantize_model` is the manual route: replace float layers of an
already-built model by quant layers (:meth:`QuantMixin.from_float`), all of
them or the named ones; ``inplace=False`` (the default) works on a deep copy.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from fusionlib.display import format_table, progress as progress_bar
from fusionlib.modules import carry_forward_hooks, eval_mode
from fusionlib.quant.calibrators import HISTOGRAM_METHODS, HistogramCalibrator, MaxCalibrator
from fusionlib.quant.descriptor import QuantDescriptor
from fusionlib.quant.functional import amax_shape_for, check_axis
from fusionlib.quant.modules import QUANT_MODULES, QuantMixin
from fusionlib.quant.tensor_quantizer import TensorQuantizer

__all__ = [
    "CALIBRATE_METHODS",
    "quantizers",
    "quant_layers",
    "weight_quantizer_ids",
    "disabled_quantizers",
    "keep_float",
    "calibrate",
    "calibrate_weights",
    "CALIBRATE_WEIGHT_METHODS",
    "load_calib_amax",
    "LayerSensitivity",
    "SensitivityReport",
    "layer_sensitivity",
    "quantize_model",
]

#: What :func:`calibrate` accepts as ``method``.
CALIBRATE_METHODS: tuple[str, ...] = ("max",) + tuple(HISTOGRAM_METHODS)
#: What :func:`calibrate_weights` accepts as ``method`` (the original's three).
CALIBRATE_WEIGHT_METHODS: tuple[str, ...] = ("max", "percentile", "mse")
_HISTOGRAM_OPTIONS = ("percentile", "start_bin", "stride")


# ---------------------------------------------------------------------- finding quantizers and layers
def quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Every TensorQuantizer of ``model`` by its qualified name (``"layer1.0.conv1.input_quantizer"``), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quant module (:class:`QuantMixin`) of ``model`` by its qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantMixin)}


def _layer_quantizers(layer: nn.Module) -> list[TensorQuantizer]:
    return [getattr(layer, name) for name in layer.quantizer_names]


def _require_quantizers(model: nn.Module, who: str) -> dict[str, TensorQuantizer]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who} takes an nn.Module, got {type(model).__name__}")
    found = quantizers(model)
    if not found:
        raise ValueError(f"{who}: {type(model).__name__} has no TensorQuantizer; build it under "
                         "fusionlib.quant.initialize() or convert it with fusionlib.quant.quantize_model() first")
    return found


def _check_layer_names(model: nn.Module, names: Iterable[str], what: str) -> list[str]:
    if isinstance(names, str):
        raise TypeError(f"{what} takes a list of layer names, got the string {names!r}; write [{names!r}]")
    names = list(names)
    layers = quant_layers(model)
    unknown = [n for n in names if n not in layers]
    if unknown:
        shown = ", ".join(list(layers)[:6]) + (", ..." if len(layers) > 6 else "")
        raise ValueError(f"{what}: {unknown} are not quant layers of {type(model).__name__} (quant layers: {shown})")
    return names


@contextlib.contextmanager
def disabled_quantizers(model: nn.Module) -> Iterator[nn.Module]:
    """``with disabled_quantizers(model):`` every quantizer passes tensors through; their switches are restored on exit."""
    saved = [(q, q.disabled) for q in quantizers(model).values()]
    try:
        for q, _ in saved:
            q.disable()
        yield model
    finally:
        for q, was_disabled in saved:
            q.disable() if was_disabled else q.enable()


def keep_float(model: nn.Module, layer_names: Iterable[str]) -> list[str]:
    """Disable the quantizers of the named quant layers (they compute in float); returns the quantizer names disabled."""
    names = _check_layer_names(model, layer_names, "keep_float")
    layers = quant_layers(model)
    done = []
    for name in names:
        for qname in layers[name].quantizer_names:
            getattr(layers[name], qname).disable()
            done.append(f"{name}.{qname}")
    return done


# ---------------------------------------------------------------------- calibration
def _check_method(method: str, kwargs: dict[str, Any]) -> None:
    if method not in CALIBRATE_METHODS:
        raise ValueError(f"method must be one of {list(CALIBRATE_METHODS)}, got {method!r}")
    allowed = _HISTOGRAM_OPTIONS if method in HISTOGRAM_METHODS else ()
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise TypeError(f"calibration method {method!r} takes " +
                        (f"only the options {list(allowed)}" if allowed else "no options") + f", got {bad}")


def weight_quantizer_ids(model: nn.Module) -> set[int]:
    """ids of the quantizers that quantize a weight (every quant layer's ``weight_quantizer``)."""
    return {id(m.weight_quantizer) for m in model.modules() if isinstance(m, QuantMixin) and hasattr(m, "weight_quantizer")}


def _uses_histogram(q: TensorQuantizer, method: str, weight_ids: set[int]) -> bool:
    """Histogram calibration for per-tensor activation quantizers under a histogram method; max otherwise."""
    return method in HISTOGRAM_METHODS and q.axis is None and id(q) not in weight_ids


def _fresh_calibrator(q: TensorQuantizer, method: str, num_bins: int, weight_ids: set[int]):
    return q.new_calibrator(_uses_histogram(q, method, weight_ids), num_bins)


def _required_inputs(model: nn.Module) -> int:
    """How many positional arguments ``model.forward`` requires (1 when it cannot be inspected)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def _batch_inputs(model: nn.Module, batch: Any) -> tuple:
    """A batch as ``model``'s positional arguments.

    A tensor ``x`` -> ``(x,)``; a loader's ``(x, y)`` -> ``(x,)``; ``((x1, x2), y)``
    -> ``(x1, x2)``. A flat tuple for a model that requires several inputs is
    ambiguous (inputs, or inputs and labels?) and an error that shows the forms.
    """
    if not isinstance(batch, (tuple, list)):
        return (batch,)
    if isinstance(batch[0], (tuple, list)):
        return tuple(batch[0])
    required = _required_inputs(model)
    if required > 1:
        raise ValueError(f"calibrate: {type(model).__name__}.forward takes {required} inputs, and a batch of "
                         f"{len(batch)} items could be inputs or (inputs, labels); yield ((x1, x2, ...), labels) "
                         "or ((x1, x2, ...),) batches")
    return (batch[0],)


def _model_device(model: nn.Module) -> torch.device | None:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return None if tensor is None else tensor.device


def _load_all_amax(named: dict[str, TensorQuantizer], method: str, kwargs: dict[str, Any],
                   weight_ids: set[int], strict: bool = True) -> dict[str, torch.Tensor]:
    """``load_calib_amax`` on every quantizer, all or nothing: on any error every amax is put back.

    A quantizer whose calibrator saw no data is an error, or with ``strict=False`` skipped (named in a warning).
    """
    saved = {name: (None if q.amax is None else q.amax.detach().clone()) for name, q in named.items()}
    try:
        unused = [name for name, q in named.items() if _calibrator_is_empty(q.calibrator)]
        shown = f"{unused[:5]}" + (" ..." if len(unused) > 5 else "")
        if unused and strict:
            raise ValueError(
                f"{len(unused)} quantizer(s) saw no data during calibration: {shown}. Their layers are not called "
                "by forward() on these batches; disable them (quantizer.disable()) or keep those layers float "
                "(keep_float), or pass strict=False to skip them")
        if unused:
            warnings.warn(f"load_calib_amax(strict=False) skips {len(unused)} quantizer(s) that saw no data: {shown}",
                          stacklevel=3)
        out = {}
        for name, q in named.items():
            if name in unused:
                continue
            if _uses_histogram(q, method, weight_ids):
                out[name] = q.load_calib_amax(method, **kwargs)
            else:
                out[name] = q.load_calib_amax()
        return out
    except BaseException:
        for name, q in named.items():
            _restore_amax(q, saved[name])
        raise


def _calibrator_is_empty(calibrator: MaxCalibrator | HistogramCalibrator) -> bool:
    if isinstance(calibrator, HistogramCalibrator):
        return calibrator.counts is None
    return calibrator.compute_amax() is None


def _restore_amax(q: TensorQuantizer, old: torch.Tensor | None) -> None:
    if old is None:
        q.clear_amax()  # back to "not calibrated" (the public setter refuses None)
    else:
        q.amax = old


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    method: str = "max",
    *,
    num_batches: int | None = None,
    num_bins: int = 2048,
    progress: bool = False,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Calibrate every enabled TensorQuantizer of ``model`` on ``batches`` and load its amax (see the module docstring).

    ``batches``: an iterable of input tensors or of ``(inputs, labels)``
    (a DataLoader), ``inputs`` a tensor or, for a model with several inputs,
    a tuple of them; the first ``num_batches`` are used (all when None).
    ``method``: ``"max"``, or ``"percentile"`` / ``"mse"`` / ``"entropy"``
    for the activation quantizers (``kwargs``: ``percentile=99.99``,
    ``start_bin=num_bins // 16``, ``stride=1``; ``num_bins`` sizes their histograms).
    Returns ``{quantizer name: amax}`` for the quantizers calibrated. On any
    error (bad arguments, empty ``batches``, a quantizer without data, an
    exception in ``forward``) no amax changes and every switch is restored.
    """
    named = _require_quantizers(model, "calibrate")
    _check_method(method, kwargs)
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    active = {name: q for name, q in named.items() if not q.disabled}
    if not active:
        raise ValueError("calibrate: every quantizer of the model is disabled; enable() the ones to calibrate")

    switches = {name: (q.quant_enabled, q.calib_enabled, q.calibrator) for name, q in active.items()}
    weight_ids = weight_quantizer_ids(model)
    device = _model_device(model)
    seen = 0
    try:
        for q in active.values():
            q.calibrator = _fresh_calibrator(q, method, num_bins, weight_ids)
            q.enable_calib()
            q.disable_quant()
        with eval_mode(model), torch.no_grad():
            for batch in progress_bar(batches, total=num_batches, desc=f"calibrate ({method})", enabled=progress):
                if num_batches is not None and seen >= num_batches:
                    break
                args = _batch_inputs(model, batch)
                model(*(a.to(device) if device is not None and isinstance(a, torch.Tensor) else a for a in args))
                seen += 1
        if seen == 0:
            raise ValueError("calibrate: batches yielded nothing; pass a non-empty loader or list of tensors")
        return _load_all_amax(active, method, kwargs, weight_ids)
    except BaseException:
        for name, q in active.items():
            q.calibrator = switches[name][2]  # the calibrators it had: nothing half-collected stays
        raise
    finally:
        for name, q in active.items():
            quant_on, calib_on, _ = switches[name]
            q.enable_quant() if quant_on else q.disable_quant()
            q.enable_calib() if calib_on else q.disable_calib()


def load_calib_amax(model: nn.Module, method: str = "max", strict: bool = True, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Recompute every enabled quantizer's amax from the statistics its calibrator holds (no pass over data).

    After ``calibrate(model, batches, "percentile")`` the activations hold
    histograms; ``load_calib_amax(model, "mse")`` picks the MSE amax from the
    same histograms (weight quantizers reload their max). A histogram
    method needs histogram calibrators (calibrate with a histogram method
    first); ``"max"`` needs max calibrators. All or nothing, like :func:`calibrate`.
    ``strict=False`` skips (and names in a warning) quantizers whose calibrator saw no data.
    """
    named = _require_quantizers(model, "load_calib_amax")
    _check_method(method, kwargs)
    active = {name: q for name, q in named.items() if not q.disabled}
    weight_ids = weight_quantizer_ids(model)
    wrong = [name for name, q in active.items()
             if isinstance(q.calibrator, HistogramCalibrator) != _uses_histogram(q, method, weight_ids)]
    if wrong:
        kind = "histogram" if method in HISTOGRAM_METHODS else "max"
        raise ValueError(f"load_calib_amax(method={method!r}) needs {kind} calibrators on the activation quantizers, "
                         f"but {wrong[:3]}{' ...' if len(wrong) > 3 else ''} hold another kind; run "
                         f"calibrate(model, batches, {method!r}) instead")
    return _load_all_amax(active, method, kwargs, weight_ids, strict)


def _weight_amax(weight: torch.Tensor, q: TensorQuantizer, method: str, axis: tuple[int, ...] | None,
                 percentile: float, num_bins: int) -> torch.Tensor:
    """What ``q``'s own calibrator gives on ``weight``: a MaxCalibrator along ``axis``, or one histogram per channel."""
    if method == "max":
        calibrator = MaxCalibrator(q.num_bits, axis, q.unsigned)
        calibrator.collect(weight)
        return calibrator.compute_amax()
    w = weight.detach()
    if axis is None:
        channels = w.reshape(1, -1)
    else:  # one row per index along the kept axes, in amax_shape_for's order
        kept = check_axis(axis, w.dim())
        rest = [d for d in range(w.dim()) if d not in kept]
        channels = w.permute(*kept, *rest).reshape(math.prod(w.shape[d] for d in kept), -1)
    amax = []
    for values in channels:
        calibrator = HistogramCalibrator(q.num_bits, None, q.unsigned, num_bins=num_bins)
        calibrator.collect(values)
        amax.append(calibrator.compute_amax(method, percentile=percentile))
    return torch.stack(amax).reshape(amax_shape_for(w.shape, axis))


def calibrate_weights(model: nn.Module, method: str = "percentile", perchannel: bool = True,
                      percentile: float = 99.99, num_bins: int = 2048) -> dict[str, torch.Tensor]:
    """Set every enabled weight quantizer's amax from its weight alone: no data, no forward pass.

    ``method``: ``"max"`` (``max |W|``), ``"percentile"`` (``percentile`` of
    ``|W|``) or ``"mse"`` (the amax minimizing the weight's fake-quantization
    error), each what the quantizer's own calibrator (:class:`MaxCalibrator`,
    :class:`HistogramCalibrator` with ``num_bins``) gives; per channel along
    the quantizer's ``axis`` (``perchannel=True``: one histogram per channel)
    or per tensor (``perchannel=False``). pytorch-quantization's name,
    arguments and default. Every amax is computed before any is set; an
    all-zero channel gets amax 1 (:meth:`TensorQuantizer.load_amax`).
    Returns ``{quantizer name: amax}``.
    """
    if method not in CALIBRATE_WEIGHT_METHODS:
        raise ValueError(f"calibrate_weights: method must be one of {list(CALIBRATE_WEIGHT_METHODS)}, got {method!r}")
    layers = {name: m for name, m in quant_layers(model).items()
              if "weight_quantizer" in m.quantizer_names and not m.weight_quantizer.disabled}
    folded = [name for name, m in layers.items() if not isinstance(getattr(m, "weight", None), torch.Tensor)]
    if folded:
        raise ValueError(f"calibrate_weights: the weight quantizers of {folded[:3]} do not quantize the layer's own "
                         "weight (QATConvBn2d quantizes the BatchNorm-folded weight); calibrate them with calibrate()")
    weights = {f"{name}.weight_quantizer": (m.weight, m.weight_quantizer) for name, m in layers.items()}
    if not weights:
        raise ValueError(f"calibrate_weights: {type(model).__name__} has no enabled weight quantizer")
    per_tensor = [name for name, (_, q) in weights.items() if perchannel and q.axis is None]
    if per_tensor:
        raise ValueError(f"calibrate_weights(perchannel=True): {per_tensor[:3]} quantize per tensor (axis=None); "
                         "pass perchannel=False, or build them with a per-channel descriptor")
    amax = {name: _weight_amax(w, q, method, q.axis if perchannel else None, percentile, num_bins)
            for name, (w, q) in weights.items()}
    for name, (_, q) in weights.items():
        q.load_amax(amax[name])
    return {name: q.amax for name, (_, q) in weights.items()}


# ---------------------------------------------------------------------- per-layer sensitivity
@dataclass(frozen=True)
class LayerSensitivity:
    """One layer quantized alone: the metric then, and its drop from the float model's (positive: worse)."""

    layer: str
    metric: float
    drop: float


@dataclass
class SensitivityReport:
    """Result of :func:`layer_sensitivity`: rows sorted by drop, largest first."""

    float_metric: float
    quantized_metric: float
    rows: list[LayerSensitivity] = field(default_factory=list)

    def worst(self, k: int) -> list[str]:
        """The names of the ``k`` layers whose quantization alone costs the most."""
        return [row.layer for row in self.rows[:k]]

    def share(self, k: int = 1) -> float:
        """How much of the sensitivity the top ``k`` layers carry: ``sum_{i<k} d_i^+ / sum_i d_i^+``.

        ``d_i^+ = max(drop_i, 0)`` (a layer that scores better quantized carries none); 0.0 when no layer drops.
        """
        drops = [max(row.drop, 0.0) for row in self.rows]
        total = sum(drops)
        return sum(drops[:k]) / total if total > 0 else 0.0

    def ratio_to_next(self) -> float:
        """``d_0^+ / d_1^+``: the top layer's drop over the next one's (``inf`` when the next drops nothing)."""
        drops = [max(row.drop, 0.0) for row in self.rows[:2]]
        if len(drops) < 2 or drops[1] == 0.0:
            return math.inf if drops and drops[0] > 0 else float("nan")
        return drops[0] / drops[1]

    def table(self, limit: int | None = None) -> str:
        rows = self.rows if limit is None else self.rows[:limit]
        return format_table(["layer", "metric (this layer quantized)", "drop vs float"],
                            [(r.layer, r.metric, r.drop) for r in rows], floatfmt=("", ".4f", "+.4f"))

    def __str__(self) -> str:
        return (f"float: {self.float_metric:.4f}, every layer quantized: {self.quantized_metric:.4f}\n"
                + self.table())


def layer_sensitivity(
    model: nn.Module,
    evaluate_fn: Callable[[nn.Module], float],
    layer_names: Iterable[str] | None = None,
    *,
    progress: bool = False,
) -> SensitivityReport:
    """Quantize one quant layer at a time (every other quantizer disabled) and report the metric's drop.

    ``evaluate_fn(model) -> float``: a higher-is-better metric, e.g.
    ``lambda m: train.evaluate(m, test_loader)``. ``layer_names``: the quant
    layers to test (default: every quant layer with an enabled quantizer).
    ``drop = float_metric − metric``, where ``float_metric`` is the metric
    with every quantizer disabled; ``quantized_metric`` is the metric with the
    quantizers as they were (usually: all layers quantized). The rows are sorted
    by drop, largest first (ties in model order). The model needs amax on every
    enabled quantizer (calibrate first); every switch is restored afterwards,
    even on error.
    """
    named = _require_quantizers(model, "layer_sensitivity")
    if not callable(evaluate_fn):
        raise TypeError(f"evaluate_fn must be a callable model -> float, got {type(evaluate_fn).__name__}")
    layers = quant_layers(model)
    if layer_names is None:
        names = [n for n, layer in layers.items() if any(not q.disabled for q in _layer_quantizers(layer))]
    else:
        names = _check_layer_names(model, layer_names, "layer_sensitivity")
    missing = [n for n, q in named.items() if not q.disabled and q.quant_enabled and q.amax is None]
    if missing:
        raise ValueError(f"layer_sensitivity: {len(missing)} enabled quantizer(s) have no amax, e.g. {missing[:3]}; "
                         "calibrate(model, batches) first")

    def measure() -> float:
        with eval_mode(model), torch.no_grad():
            return float(evaluate_fn(model))

    enabled = {q for q in named.values() if not q.disabled}
    rows = []
    quantized_metric = measure()
    with disabled_quantizers(model):  # every switch restored on exit, also on error
        float_metric = measure()
        for name in progress_bar(names, desc="layer sensitivity", enabled=progress):
            chosen = [q for q in _layer_quantizers(layers[name]) if q in enabled]
            for q in chosen:
                q.enable()
            metric = measure()
            for q in chosen:
                q.disable()
            rows.append(LayerSensitivity(name, metric, float_metric - metric))
    rows.sort(key=lambda r: -r.drop)  # stable: ties keep model order
    return SensitivityReport(float_metric, quantized_metric, rows)


# ---------------------------------------------------------------------- the manual route
def _why_not_convertible(module: nn.Module) -> str | None:
    """Why a module that looks like a convertible layer is not one; None for exactly a ``QUANT_MODULES`` class."""
    if type(module) in QUANT_MODULES:
        if any(type(h).__name__ == "WeightNorm" for h in module._forward_pre_hooks.values()):
            return "its weight is recomputed by torch.nn.utils.weight_norm; torch.nn.utils.remove_weight_norm first"
        return None
    if isinstance(module, QuantMixin):
        return "already quantized"
    if getattr(module, "parametrizations", None) is not None:
        return ("its weight is parametrized (weight_norm, spectral_norm, ...); "
                "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') first")
    if isinstance(module, tuple(QUANT_MODULES)):
        return "a subclass, whose own forward a quant layer would lose"
    return f"not a convertible type ({', '.join(f'nn.{c.__name__}' for c in QUANT_MODULES)})"


def quantize_model(
    model: nn.Module,
    layer_names: Iterable[str] | None = None,
    *,
    exclude: Iterable[str] = (),
    quant_desc_input: QuantDescriptor | None = None,
    quant_desc_weight: QuantDescriptor | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Replace float layers of a built model by quant layers (``QuantConv2d.from_float`` and friends).

    ``layer_names``: the qualified names to convert (default: every module
    whose type is exactly one of ``QUANT_MODULES``' float classes; look-alikes
    left float, parametrized or ``weight_norm`` layers and subclasses, are
    named in a warning); ``exclude``: names to leave float. Descriptors
    default to each quant class's defaults (``quant_desc_weight`` applies to
    layers with a weight). A module shared under several names is one module:
    naming (or excluding) any of its names converts (or keeps) it under all
    of them, as one shared quant module. Each quant layer keeps its float
    layer's forward hooks (:func:`fusionlib.modules.carry_forward_hooks`).
    Everything is checked and built before anything is replaced: a bad name
    changes nothing. ``inplace=False`` converts a deep copy; the caller's
    model is never touched. Returns the converted model (the new module
    itself when ``model`` is a single layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model takes an nn.Module, got {type(model).__name__}")
    if isinstance(layer_names, str) or isinstance(exclude, str):
        bad = layer_names if isinstance(layer_names, str) else exclude
        raise TypeError(f"layer names are given as a list, got the string {bad!r}; write [{bad!r}]")
    modules = dict(model.named_modules(remove_duplicate=False))
    exclude = list(exclude)
    chosen = list(modules) if layer_names is None else list(layer_names)
    unknown = [n for n in exclude + chosen if n not in modules]
    if unknown:
        raise ValueError(f"quantize_model: {type(model).__name__} has no submodule(s) {unknown}")
    reasons = {n: _why_not_convertible(modules[n]) for n in chosen}
    if layer_names is not None:
        wrong = [f"{n} ({type(modules[n]).__name__}: {why})" for n, why in reasons.items() if why is not None]
        if wrong:
            raise ValueError(f"quantize_model cannot convert {wrong}")
    else:
        look_alikes = [f"{n} ({type(modules[n]).__name__}: {why})" for n, why in reasons.items()
                       if why is not None and isinstance(modules[n], tuple(QUANT_MODULES))
                       and not isinstance(modules[n], QuantMixin)]
        if look_alikes:
            warnings.warn(f"quantize_model leaves float: {'; '.join(look_alikes)}", UserWarning, stacklevel=2)
    kept = {id(modules[n]) for n in exclude}
    chosen_ids = {id(modules[n]) for n, why in reasons.items() if why is None and id(modules[n]) not in kept}
    targets = [n for n, m in modules.items() if id(m) in chosen_ids]  # every name of a chosen module

    if not inplace:
        model = copy.deepcopy(model)
        modules = dict(model.named_modules(remove_duplicate=False))
    new_by_id: dict[int, nn.Module] = {}
    for name in targets:  # build every replacement first
        old = modules[name]
        if id(old) not in new_by_id:
            quant_class = QUANT_MODULES[type(old)]
            extra = {} if quant_class.default_quant_desc_weight is None else {"quant_desc_weight": quant_desc_weight}
            new_by_id[id(old)] = quant_class.from_float(old, quant_desc_input=quant_desc_input, **extra)
            carry_forward_hooks(old, new_by_id[id(old)], name)
    if "" in targets:  # the model is itself one convertible layer
        return new_by_id[id(modules[""])]
    for name in targets:
        model.set_submodule(name, new_by_id[id(modules[name])])
    return model
