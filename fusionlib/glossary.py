"""The record glossary: one name per quantity, across every notebook.

A notebook publishes its key figures with :func:`fusionlib.experiments.record`;
sweeps put them side by side in one table, so a name must mean the same thing
everywhere. A record name is ``<quantity>_<details>``: the quantity is one of
the prefixes below, which fixes meaning and unit; the details say what was
measured, most general first and the model last, e.g.
``max_rel_error_photos_resnet18`` or ``speedup_fold_mobilenet_v2_b8``.

Records are scalars (numbers, booleans or short strings), never dicts or lists,
so a sweep can tabulate them. A speed-up is recorded with its paired 95%
interval as the sibling records ``<name>_lo`` and ``<name>_hi``
(:func:`fusionlib.experiments.record_speedup`).

:func:`lookup` gives a name's meaning; :func:`check_records` lists what is wrong
with a notebook's records (``tests/test_glossary.py`` runs it on every
committed notebook).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["Quantity", "GLOSSARY", "lookup", "check_records"]


@dataclass(frozen=True)
class Quantity:
    """What a record prefix means, and its unit."""

    prefix: str
    meaning: str
    unit: str


GLOSSARY: tuple[Quantity, ...] = (
    Quantity("test_accuracy", "top-1 accuracy on the digits test split", "fraction in [0, 1]"),
    Quantity("max_rel_error", "largest relative error of a transformed model's outputs against the "
             "unoptimized model (verify.compare_outputs: max |a - b| / max |a|); details name the data "
             "(digits unless 'photos'), the precision (fp32 unless 'fp64') and the case", "dimensionless"),
    Quantity("max_abs_error", "largest absolute difference between two outputs (verify.compare_outputs)",
             "output units"),
    Quantity("speedup", "paired speed-up: median over interleaved rounds of baseline time / candidate time "
             "(> 1: faster); '_lo' / '_hi' siblings bound its 95% interval (bench.compare_latency)", "ratio"),
    Quantity("ideal_speedup", "speed-up predicted from operation counts (ratio of MACs)", "ratio"),
    Quantity("time_share", "share of a profiled forward pass spent in one kind of node "
             "(fx.ProfilingInterpreter)", "fraction in [0, 1]"),
    Quantity("gmacs", "multiply-accumulates of one forward pass of one image", "10^9 MACs"),
    Quantity("mparams", "number of parameters", "10^6 parameters"),
    Quantity("mac_share", "share of a model's MACs in one kind of layer", "fraction in [0, 1]"),
    Quantity("mac_ratio", "ratio of two MAC counts (details say which over which)", "ratio"),
    Quantity("throughput_ratio", "ratio of two achieved throughputs (e.g. MACs per second of one layer kind "
             "over another's)", "ratio"),
    Quantity("param_ratio", "ratio of two parameter counts (details say which over which)", "ratio"),
    Quantity("nodes", "number of nodes in a traced torch.fx graph (details: an opcode, then the model)",
             "count"),
    Quantity("fused_groups", "module groups fused by fuse_modules", "count"),
    Quantity("folded_bn", "BatchNorm layers folded into the preceding layer", "count"),
    Quantity("replaced_ops", "graph nodes rewritten by a replace_ops pass", "count"),
    Quantity("seconds", "wall-clock time of a library call (details say which)", "seconds"),
    Quantity("epochs", "training epochs", "count"),
    Quantity("test_accuracy_std", "standard deviation over training seeds of the top-1 accuracy on the digits "
             "test split (details name the variant and model)", "fraction in [0, 1]"),
    Quantity("kl_divergence", "symmetric KL divergence (KL(P||Q) + KL(Q||P)) / 2 between two output distributions, "
             "per sample (rdrop.symmetric_kl_per_sample; details say which two)", "nats"),
    Quantity("seconds_epoch", "wall-clock seconds of one training epoch, evaluation excluded (train.fit's "
             "history; details name the variant and model)", "seconds"),
    Quantity("top1_agreement", "share of digits test images on which a transformed model (e.g. fake-quantized) "
             "predicts the same class as the unoptimized model", "fraction in [0, 1]"),
    Quantity("sqnr_db", "signal-to-quantization-noise ratio of a fake-quantized tensor, "
             "10 log10(sum x^2 / sum (x - fq(x))^2) (details: the tensor, bits, per-tensor / per-channel, model)",
             "dB"),
    Quantity("quant_mse", "mean squared fake-quantization error, mean (x - fq(x))^2 (details: the tensor, bits, "
             "how amax was chosen)", "squared units of x"),
    Quantity("amax_fraction", "a chosen amax as a fraction of max |x| of the same data (details: how it was chosen, "
             "bits, model)", "fraction"),
    Quantity("accuracy_drop", "test accuracy of the float model minus that of a transformed one (e.g. PTQ-quantized; "
             "details: how, bits, weights per channel / per tensor, model); positive: the transformed model is worse",
             "fraction in [-1, 1]"),
    Quantity("cosine_similarity", "cosine similarity <a, b> / (|a| |b|) of a transformed model's activations or outputs "
             "against the unoptimized model's, in float64 (verify.layer_report; details: which layer or 'min' over "
             "layers, the precision, model)", "dimensionless in [-1, 1]"),
    Quantity("identical_fraction", "fraction of elements on which two implementations give bit-identical results "
             "(details: which two, on what)", "fraction in [0, 1]"),
    Quantity("max_lsb_error", "largest difference, in quantization steps (LSB), between two integer outputs on the "
             "same grid (details: which two, the input grid, model)", "steps"),
    Quantity("grid_fraction", "share of weights that lie on a quantization grid, i.e. are integer multiples of "
             "their channel's step amax / qmax (details: which weights, which grid, model)", "fraction in [0, 1]"),
    Quantity("model_mb", "size on disk of a model's state dict written by torch.save (details: fp32 or int8, "
             "model)", "10^6 bytes"),
    Quantity("onnx_mb", "size on disk of an ONNX file (details: which export, e.g. fp32, qdq or qdq_int8 for Q/DQ "
             "with int8-stored weights; model)", "10^6 bytes"),
    Quantity("onnx_nodes", "nodes in an ONNX graph (details: exported or ort, i.e. after ONNX Runtime's graph "
             "optimizations; an op type or 'all'; model)", "count"),
    Quantity("inference_precision", "the precision a runtime computes a model's float parts in, as the compiled "
             "model reports it (details: the runtime, and how it was chosen, e.g. ov_default: OpenVINO's CPU plugin "
             "without a precision hint)", "name: f32, bf16 or f16"),
)

_BY_PREFIX = sorted(GLOSSARY, key=lambda q: len(q.prefix), reverse=True)  # longest prefix wins
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")


def lookup(name: str) -> Quantity | None:
    """The :class:`Quantity` a record name belongs to (its longest matching prefix), or ``None``."""
    for quantity in _BY_PREFIX:
        if name == quantity.prefix or name.startswith(quantity.prefix + "_"):
            return quantity
    return None


def check_records(records: Mapping[str, Any]) -> list[str]:
    """Problems with ``records`` (name -> value): unknown prefixes, bad names, non-scalars, lone intervals.

    An empty list means every record is in the glossary, is a scalar, and every
    ``<name>_lo`` / ``<name>_hi`` comes with its ``<name>``.
    """
    problems = []
    for name, value in records.items():
        if not _NAME.match(name):
            problems.append(f"{name!r}: names are lower_snake_case ASCII")
        if lookup(name) is None:
            prefixes = ", ".join(q.prefix for q in GLOSSARY)
            problems.append(f"{name!r}: no glossary prefix matches; use one of {prefixes} "
                            f"(or add a Quantity to fusionlib.glossary.GLOSSARY)")
        if not (value is None or isinstance(value, (bool, int, float, str))):
            problems.append(f"{name!r}: records are scalars, got a {type(value).__name__}")
        for suffix in ("_lo", "_hi"):
            if name.endswith(suffix) and lookup(name) and lookup(name).prefix == "speedup":
                if name[: -len(suffix)] not in records:
                    problems.append(f"{name!r}: an interval bound without its estimate {name[:-len(suffix)]!r}")
    for name in records:
        if lookup(name) and lookup(name).prefix == "speedup" and not name.endswith(("_lo", "_hi")):
            missing = [name + s for s in ("_lo", "_hi") if name + s not in records]
            if missing:
                problems.append(f"{name!r}: a speed-up without its interval ({', '.join(missing)}); "
                                f"use experiments.record_speedup")
    return problems
