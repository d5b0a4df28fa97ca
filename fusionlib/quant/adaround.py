r"""AdaRound: learn, per weight, whether to round up or down (notebook 17).

Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization".

Nearest rounding makes each weight's error as small as possible, one weight at a
time; what matters is the layer's *output*. With the step ``Δ = amax / qmax``
fixed, each weight has two candidates, ``⌊W/Δ⌋`` and ``⌊W/Δ⌋ + 1``. AdaRound
relaxes the binary choice to ``h(V) ∈ [0, 1]``, a rectified sigmoid::

    h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1),       ζ = 1.1, γ = −0.1
    W_soft = Δ · clamp(⌊W/Δ⌋ + h(V), qmin, qmax)

and minimizes, per layer, the reconstruction error of its output plus a
regularizer that pushes every ``h`` to 0 or 1::

    loss = mean_n ‖f(x̃_n; W_soft) − f_float(x_n; W)‖² + λ · Σ (1 − |2h(V) − 1|^β)

``x̃`` is the layer's input in the quantized model (earlier layers already
rounded), the target the float layer's output on the float model's input.
``β`` stays at ``beta[0]`` for the first ``warmup`` share of the iterations
(with ``λ = 0``: reconstruction only), then falls linearly to ``beta[1]``: a high
``β`` lets ``h`` move freely, a low one forces it to a corner. ``V`` starts where
``h(V)`` equals the fractional part ``W/Δ − ⌊W/Δ⌋``, so ``W_soft = W`` at start.
At the end ``h`` is read hard, up where ``V >= 0``, and the weight is set to
``Δ · clamp(⌊W/Δ⌋ + [V >= 0], qmin, qmax)``: exactly on the quantizer's grid, so the
weight quantizer (kept, amax unchanged) returns it unchanged.

**The grid is frozen.** ``amax`` must be set before (calibrate the weights
first) and is frozen after (:func:`freeze_amax`): a later ``calibrate`` or
``calibrate_weights`` leaves it, since a new amax would move the grid the
rounding was learned on.

**Which models.** Models built by :func:`~fusionlib.quant.quantize_model`
(``QuantConv*d`` / ``QuantLinear``, weights quantized as stored); ``prepare_qat``
graphs are refused (their ``QATConvBn2d`` quantizes a weight folded on the fly).
An 8-bit result exports to ONNX with :func:`fusionlib.deploy.export_onnx` like
any PTQ model (Q/DQ pairs); :func:`fusionlib.quant.int8.convert_int8` takes
``prepare_qat`` graphs only, so an AdaRound model reaches int8 kernels through
ONNX Runtime, not through torch's int8 CPU kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from fusionlib.display import format_table, progress as progress_bar
from fusionlib.quant.equalize import (
    _check_batches,
    _check_quant_layers,
    _layer_op,
    _require_eval,
    execution_order,
    layer_inputs,
)
from fusionlib.quant.functional import check_num_bits, dequantize
from fusionlib.quant.tensor_quantizer import TensorQuantizer

__all__ = ["ZETA", "GAMMA", "rectified_sigmoid", "rounding_regularizer", "FrozenAmaxQuantizer", "freeze_amax",
           "AdaRoundLayer", "AdaRoundReport", "adaround"]

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1)`` with ``ζ = 1.1``, ``γ = −0.1``: exactly 0 or 1 beyond finite V."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``Σ (1 − |2h − 1|^β)``: 0 when every h is 0 or 1, largest at h = ½."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


class FrozenAmaxQuantizer(TensorQuantizer):
    """A TensorQuantizer whose amax calibration cannot change (``load_amax`` / ``load_calib_amax`` keep it).

    Setting ``quantizer.amax = ...`` by hand still works: a deliberate change, not a calibration.
    """

    def load_amax(self, amax: torch.Tensor) -> None:
        return None

    def load_calib_amax(self, method: str | None = None, strict: bool = True, **kwargs: Any) -> torch.Tensor | None:
        return self.amax


def freeze_amax(quantizer: TensorQuantizer) -> TensorQuantizer:
    """Make ``quantizer`` a :class:`FrozenAmaxQuantizer` (in place; it must have an amax). Returns it."""
    if quantizer.amax is None:
        raise ValueError(f"{quantizer._who()} has no amax to freeze; calibrate it first")
    quantizer.__class__ = FrozenAmaxQuantizer
    return quantizer


@dataclass
class AdaRoundLayer:
    """One layer: output MSE with nearest and with learned rounding, the share of weights rounded otherwise,
    and the regularized loss at the first and the last step after the warm-up."""

    layer: str
    mse_nearest: float
    mse_adaround: float
    flipped: float
    loss_first: float
    loss_last: float
    seconds: float


@dataclass
class AdaRoundReport:
    """What :func:`adaround` did, one row per layer in depth order."""

    layers: list[AdaRoundLayer] = field(default_factory=list)

    def table(self, limit: int | None = None) -> str:
        rows = self.layers if limit is None else self.layers[:limit]
        return format_table(["layer", "output MSE nearest", "output MSE AdaRound", "rounded otherwise"],
                            [(r.layer, r.mse_nearest, r.mse_adaround, r.flipped) for r in rows],
                            floatfmt=("", ".3e", ".3e", ".1%"))

    def __str__(self) -> str:
        better = sum(r.mse_adaround < r.mse_nearest for r in self.layers)
        return f"AdaRoundReport: {len(self.layers)} layers, output error lower than nearest on {better}\n" + self.table(8)


def _grid(q: TensorQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(step Δ broadcast against ``w``, the integer floor ⌊W/Δ⌋), from the quantizer's amax."""
    amax = q.amax.detach().float()
    if amax.numel() > 1:
        shape = [1] * w.dim()
        axis = q.axis if isinstance(q.axis, int) else q.axis[0]
        shape[axis] = -1
        amax = amax.reshape(shape)
    step = amax / q.quant_max
    return step, torch.floor(w / step)


def _on_grid(q: TensorQuantizer, integers: torch.Tensor) -> torch.Tensor:
    """``integers`` clamped to the grid, in the weight's units, computed as the quantizer computes (``q · step_size``)."""
    integers = integers.clamp(q.quant_min, q.quant_max)
    return dequantize(integers, q.amax.detach().reshape(-1) if q.amax.numel() > 1 else q.amax.detach(),
                      q.num_bits, q.unsigned, q.axis if q.amax.numel() > 1 else None)


def _round_layer(name: str, layer: nn.Module, x: torch.Tensor, target: torch.Tensor, num_iterations: int,
                 reg_weight: float, beta: tuple[float, float], warmup: float, lr: float, batch_size: int,
                 generator: torch.Generator) -> AdaRoundLayer:
    import time

    start = time.perf_counter()
    with torch.enable_grad():
        row = _learn_rounding(name, layer, x, target, num_iterations, reg_weight, beta, warmup, lr, batch_size, generator)
    freeze_amax(layer.weight_quantizer)
    row.seconds = time.perf_counter() - start
    return row


def _learn_rounding(name: str, layer: nn.Module, x: torch.Tensor, target: torch.Tensor, num_iterations: int,
                    reg_weight: float, beta: tuple[float, float], warmup: float, lr: float, batch_size: int,
                    generator: torch.Generator) -> AdaRoundLayer:
    q = layer.weight_quantizer
    w = layer.weight.detach().float()
    step, floor = _grid(q, w)
    rest = (w / step - floor).clamp(0, 1)
    v = torch.log((rest - GAMMA) / (ZETA - rest)).clamp(-12, 12)     # h(V) = rest: sigmoid(V) = (rest − γ)/(ζ − γ)
    v = v.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=lr)
    bias = None if layer.bias is None else layer.bias.detach()
    qmin, qmax = q.quant_min, q.quant_max
    n = x.shape[0]
    warm = int(warmup * num_iterations)
    losses = []
    for it in range(num_iterations):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        h = rectified_sigmoid(v)
        w_soft = step * torch.clamp(floor + h, qmin, qmax)
        out = _layer_op(layer, x[idx], w_soft, bias)
        reconstruction = (out - target[idx]).pow(2).flatten(1).sum(1).mean()
        if it < warm:
            loss = reconstruction
        else:
            progress = (it - warm) / max(1, num_iterations - warm)
            b = beta[0] + (beta[1] - beta[0]) * progress
            loss = reconstruction + reg_weight * rounding_regularizer(h, b)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if it >= warm:
            losses.append(float(loss.detach()))
    with torch.no_grad():
        nearest = q(w)
        learned = q(_on_grid(q, floor + (v >= 0).float())).to(layer.weight.dtype)   # the quantizer's own grid values
        mse = lambda wt: float(((_layer_op(layer, x, wt, bias) - target) ** 2).mean())  # noqa: E731
        row = AdaRoundLayer(name, mse(nearest), mse(learned), float((learned != nearest).float().mean()),
                            losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"), 0.0)
        layer.weight.copy_(learned)
    return row


def adaround(
    quant_model: nn.Module,
    float_model: nn.Module,
    batches: Iterable[Any],
    num_iterations: int = 200,
    reg_weight: float = 0.01,
    beta: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
    *,
    lr: float = 0.01,
    batch_size: int = 32,
    num_bits: int | None = None,
    layer_names: Iterable[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> AdaRoundReport:
    """Learn the rounding of every quantized weight, layer by layer in depth order; see the module docstring.

    ``adaround(quant_model, float_model, batches, num_iterations=200, reg_weight=0.01, beta=(20, 2), warmup=0.2)
    -> AdaRoundReport``, in place on ``quant_model`` (a :func:`quantize_model` copy of
    ``float_model`` whose weight quantizers have an amax). ``batches``: inputs or
    ``(inputs, labels)``, all of them used as the reconstruction set, ``batch_size``
    samples per Adam step (``lr``). ``num_bits``: when given, every weight quantizer
    must have that width (a check). ``layer_names``: the layers to round (default:
    every quant layer with an enabled weight quantizer). Afterwards each weight is on
    its grid and its amax frozen (:func:`freeze_amax`). Activation quantizers are
    used as they are set: disable them (or leave them uncalibrated and disabled) to
    round against float activations, as the paper does before calibrating them.
    """
    _require_eval(quant_model, "quant_model", "adaround")
    _require_eval(float_model, "float_model", "adaround")
    layers = _check_quant_layers(quant_model, "adaround")
    if num_bits is not None:
        check_num_bits(num_bits)
        other = {n: m.weight_quantizer.num_bits for n, m in layers.items() if m.weight_quantizer.num_bits != num_bits}
        if other:
            name = next(iter(other))
            raise ValueError(f"adaround(num_bits={num_bits}): the weight quantizer of {name} has {other[name]} bits "
                             f"({len(other)} layer(s) differ); build the model with QuantDescriptor(num_bits={num_bits})")
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 0:
        raise ValueError(f"num_iterations must be an int >= 0, got {num_iterations!r}")
    if not 0 <= warmup <= 1:
        raise ValueError(f"warmup is a share of the iterations in [0, 1], got {warmup!r}")
    if len(beta) != 2 or not beta[0] >= beta[1] > 0:
        raise ValueError(f"beta = (start, end) with start >= end > 0, got {beta!r}")
    data = _check_batches(batches, "adaround")
    if layer_names is not None:
        unknown = [n for n in layer_names if n not in layers]
        if unknown:
            raise ValueError(f"adaround: {unknown} are not quant layers with a weight quantizer")
        layers = {n: layers[n] for n in layer_names}
    missing = [n for n in layers if not _has(float_model, n)]
    if missing:
        raise ValueError(f"adaround: float_model has no layer {missing[0]!r}; pass the float model quant_model was built from")
    generator = torch.Generator().manual_seed(seed)
    report = AdaRoundReport()
    for name in progress_bar(execution_order(quant_model, layers, data[0]), desc="adaround", enabled=progress,
                             unit="layer"):
        layer = layers[name]
        x = torch.cat([layer.input_quantizer(t) for t in layer_inputs(quant_model, layer, data)])
        float_layer = float_model.get_submodule(name)
        with torch.no_grad():
            target = torch.cat([float_layer(t) for t in layer_inputs(float_model, float_layer, data)])
        report.layers.append(_round_layer(name, layer, x, target, num_iterations, reg_weight, tuple(beta), warmup, lr,
                                          batch_size, generator))
    return report


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
