"""One model through every float step of the course, in order: the capstone's assembly (notebook 18).

Each step is a library call of an earlier chapter, applied to a copy of the
step before; this module only puts them in order and says which ones must be
exact::

    trained          the re-parameterizable model, BatchNorm statistics recomputed    train.recalibrate_batchnorm (06)
    reparameterized  every RepBlock one conv: W' = k3 W3 + k1 P(W1) + k0 I           reparam.reparameterize_model (06)
    folded           BatchNorm folded: W·γ/σ, β + (b − μ)·γ/σ                      fx.fuse_conv_bn (02, 05)
    relu             ReLU6 -> ReLU (CLE needs f(s·z) = s·f(z)): a model change       quant.fold_and_swap_relu6 (17)
    equalized        W1[i]/s_i, b1[i]/s_i, W2[:, i]·s_i, s_i = sqrt(r1_i / r2_i)      quant.cross_layer_equalization (17)

``reparameterized``, ``folded`` and ``equalized`` compute the function of the
step they are checked against (:data:`EXACT_AGAINST`): a relative error of
float32 rounding, about 1e-6. ``relu`` is the one float step that changes the
model: wherever a pre-activation exceeds 6, ReLU passes what ReLU6 clipped.
Then, outside this module: QAT of the last float step
(``zoo.trained_model(name, "pipeline", ...)``: ``prepare_qat`` finds no BatchNorm,
so every conv becomes a ``QATConv2d`` that trains the deployed weight itself),
``quant.int8.convert_int8``, ``deploy.export_onnx`` (Q/DQ), ONNX Runtime and OpenVINO.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from fusionlib.fx import fuse_conv_bn
from fusionlib.modules import require_eval_mode
from fusionlib.quant.equalize import EqualizationReport, cross_layer_equalization, fold_and_swap_relu6
from fusionlib.reparam import reparameterize_model
from fusionlib.train import recalibrate_batchnorm

__all__ = ["EXACT_AGAINST", "FLOAT_STEPS", "FloatSteps", "check_recipe", "float_steps", "output_step", "relu6_clipped_share",
           "relu6_input_counts"]

#: The float steps in order (``relu`` and ``equalized`` only with ``equalize=True``).
FLOAT_STEPS = ("trained", "reparameterized", "folded", "relu", "equalized")

#: Each exact step and the step whose outputs it must reproduce.
EXACT_AGAINST = {"reparameterized": "trained", "folded": "reparameterized", "equalized": "relu"}


@dataclass
class FloatSteps:
    """The models :func:`float_steps` made, in order (``models``), with CLE's report (``None`` without CLE)."""

    models: dict[str, nn.Module]
    report: EqualizationReport | None = None
    relu6_replaced: list[str] = field(default_factory=list)

    @property
    def last(self) -> nn.Module:
        """The model the quantized steps start from: ``equalized``, or ``folded`` without CLE."""
        return list(self.models.values())[-1]

    def exact_pairs(self) -> list[tuple[str, str]]:
        """``(step, reference step)`` for every exact step present."""
        return [(step, ref) for step, ref in EXACT_AGAINST.items() if step in self.models and ref in self.models]


def output_step(model: nn.Module) -> float:
    """One step of a ``prepare_qat`` graph's quantized output: ``amax / quant_max`` of the quantizer producing it.

    The logits of the fake-quant model, and of every int8 runtime built from it,
    are multiples of this step; two classes within one step of each other are
    a tie at that resolution (``deploy.top1_agreement(..., tolerance=step)``).
    Raises ValueError when the output is not one calibrated per-tensor quantizer's.
    """
    from fusionlib.quant.tensor_quantizer import TensorQuantizer

    graph = getattr(model, "graph", None)
    outputs = [n for n in graph.nodes if n.op == "output"] if graph is not None else []
    node = outputs[0].args[0] if outputs else None
    quantizer = model.get_submodule(node.target) if getattr(node, "op", None) == "call_module" else None
    if not isinstance(quantizer, TensorQuantizer) or quantizer.amax is None or quantizer.amax.numel() != 1:
        raise ValueError(f"output_step takes a calibrated prepare_qat graph whose output is one per-tensor quantizer's; "
                         f"{type(model).__name__}'s output is {getattr(node, 'target', node)!r}")
    return float(quantizer.amax) / quantizer.quant_max


def relu6_input_counts(model: nn.Module, inputs: torch.Tensor) -> list[tuple[str, int, int]]:
    """``(ReLU6 module name, its input elements above 6, its input elements)`` for every ReLU6 call, in call order.

    The inputs are read by forward *pre*-hooks: with ``inplace=True`` (torchvision's
    MobileNetV2) a forward hook would see the clipped tensor. Runs in eval mode
    without gradients; the model's modes and hooks are left as they were.
    """
    calls: list[tuple[str, int, int]] = []

    def count(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            calls.append((name, int((args[0] > 6).sum()), args[0].numel()))
        return hook

    handles = [m.register_forward_pre_hook(count(name)) for name, m in model.named_modules() if isinstance(m, nn.ReLU6)]
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            model.eval()(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return calls


def relu6_clipped_share(model: nn.Module, inputs: torch.Tensor) -> tuple[float, dict[str, float]]:
    """What replacing ReLU6 by ReLU changes: the share of ReLU6 inputs above 6 on ``inputs`` (ReLU passes them).

    Returns ``(share over every ReLU6 input element, {ReLU6 module name: its share})``;
    a module called several times counts every call (:func:`relu6_input_counts`).
    ``(0.0, {})`` for a model without ReLU6.
    """
    per_module: dict[str, list[int]] = {}
    for name, above, total in relu6_input_counts(model, inputs):
        seen = per_module.setdefault(name, [0, 0])
        seen[0] += above
        seen[1] += total
    above, total = sum(c[0] for c in per_module.values()), sum(c[1] for c in per_module.values())
    return (above / total if total else 0.0), {name: c[0] / c[1] for name, c in per_module.items()}


def check_recipe(equalize: bool, cle_iterations: int) -> None:
    """The float steps' own options, checked (one rule for :func:`float_steps` and the zoo's pipeline recipe)."""
    if not isinstance(equalize, bool):
        raise ValueError(f"equalize must be True or False, got {equalize!r}")
    if not isinstance(cle_iterations, int) or isinstance(cle_iterations, bool) or cle_iterations < 0:
        raise ValueError(f"cle_iterations must be an int >= 0, got {cle_iterations!r}")


def float_steps(
    model: nn.Module,
    recalibration_batches: Iterable | None = None,
    example_inputs: torch.Tensor | None = None,
    *,
    equalize: bool = True,
    cle_iterations: int = 20,
    tolerance: float = 1e-6,
) -> FloatSteps:
    """Run the float steps of the module docstring on copies of ``model``; the caller's model is never touched.

    ``recalibration_batches`` (a loader of ``(x, y)`` or inputs) recomputes the
    BatchNorm statistics first (``None``: the stored ones are kept, the
    ``trained`` step is a plain copy). ``equalize=False`` stops after
    ``folded``. ``example_inputs`` are passed to CLE (a trace check). The model
    must be in eval mode: folding and reparameterization use running statistics.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"float_steps takes an nn.Module, got {type(model).__name__}")
    require_eval_mode(model, "float_steps", "reparameterization and folding use the running statistics")
    check_recipe(equalize, cle_iterations)
    trained = copy.deepcopy(model)
    if recalibration_batches is not None:
        recalibrate_batchnorm(trained, recalibration_batches)
    models: dict[str, nn.Module] = {"trained": trained.eval()}
    models["reparameterized"] = reparameterize_model(trained).eval()
    models["folded"] = fuse_conv_bn(models["reparameterized"]).eval()
    if not equalize:
        return FloatSteps(models)
    relu, replaced, _ = fold_and_swap_relu6(models["folded"])
    models["relu"] = relu.eval()
    models["equalized"], report = cross_layer_equalization(models["folded"], example_inputs,
                                                           max_iterations=cle_iterations, tolerance=tolerance)
    models["equalized"].eval()
    return FloatSteps(models, report, list(dict.fromkeys(replaced)))   # a shared ReLU6 once, not once per call
