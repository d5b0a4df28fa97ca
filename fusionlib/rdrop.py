"""R-Drop: regularized dropout (Liang et al., NeurIPS 2021), the loss and a training step.

Dropout trains a different sub-network at every step (each unit kept with
probability ``1 - p``, kept units scaled by ``1 / (1 - p)`` so that the
expectation matches the full network used at inference). R-Drop feeds each
sample through the network twice, with two independent dropout masks, and asks
the two output distributions to agree:

* two passes: ``z1 = f(x; mask1)``, ``z2 = f(x; mask2)``, ``P1 = softmax(z1)``,
  ``P2 = softmax(z2)`` over the last dimension;
* symmetric KL divergence::

      KL_sym = (KL(P1 || P2) + KL(P2 || P1)) / 2,   KL(P || Q) = sum_c P_c (log P_c - log Q_c)

* the loss::

      L = (CE(z1, y) + CE(z2, y)) / 2  +  alpha * KL_sym

:func:`compute_kl_loss` is the paper's reference code (``F.kl_div`` element-wise
on log-softmax / softmax, padded positions zeroed, summed); :func:`rdrop_loss`
combines it with the cross-entropies and returns the parts;
:func:`rdrop_forward` runs the two passes on a model, as two forwards or as one
forward of ``torch.cat([x, x])`` (the same expected loss; single draws differ,
because the random stream is consumed differently and BatchNorm's running
statistics update once instead of twice); :class:`RDropStep` plugs it into
:func:`fusionlib.train.fit`. Training a course model with it, cached, is
``zoo.trained_model(name, "rdrop", alpha=...)`` (notebook 12).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "REDUCTIONS",
    "RDropParts",
    "RDropOutput",
    "RDropStep",
    "compute_kl_loss",
    "rdrop_loss",
    "rdrop_forward",
    "symmetric_kl_per_sample",
    "SubnetworkGap",
    "classifier_dropout",
    "subnetwork_gap",
]

#: How :func:`compute_kl_loss` reduces the element-wise KL: ``"sum"`` (the paper's code), ``"batchmean"``, ``"mean"``.
REDUCTIONS = ("sum", "batchmean", "mean")


def _check_logits(p_logits: Any, q_logits: Any) -> None:
    for name, value in (("p_logits", p_logits), ("q_logits", q_logits)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of logits, got dtype {value.dtype}")
        if value.dim() < 1 or value.shape[-1] < 1:
            raise ValueError(f"{name} needs a last dimension of classes, got shape {tuple(value.shape)}")
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"the two passes' logits must have the same shape, got {tuple(p_logits.shape)} "
                         f"and {tuple(q_logits.shape)}")


def _check_pad_mask(pad_mask: Any, shape: torch.Size) -> None:
    if not isinstance(pad_mask, torch.Tensor) or pad_mask.dtype != torch.bool:
        got = pad_mask.dtype if isinstance(pad_mask, torch.Tensor) else type(pad_mask).__name__
        raise TypeError(f"pad_mask must be a bool tensor (True = padding, ignored), got {got}")
    try:
        broadcast = torch.broadcast_shapes(pad_mask.shape, shape)
    except RuntimeError:
        broadcast = None
    if broadcast != shape:
        hint = (" (a mask of the logits' shape without the class dimension: use pad_mask.unsqueeze(-1))"
                if tuple(pad_mask.shape) == tuple(shape[:-1]) else "")
        raise ValueError(f"pad_mask of shape {tuple(pad_mask.shape)} does not broadcast to the logits' shape "
                         f"{tuple(shape)}{hint}")


def _check_reduction(reduction: Any) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(map(repr, REDUCTIONS))}")


def _check_kl_weight(alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha weighs the KL term and must be a finite number >= 0, got {alpha!r}")


@contextlib.contextmanager
def _kl_precision(*logits: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The logits in float32 if float16 / bfloat16 (else as given), with autocast off while the KL is computed."""
    with torch.autocast(logits[0].device.type, enabled=False):
        yield tuple(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z for z in logits)


def compute_kl_loss(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    pad_mask: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Symmetric KL of the two passes' softmax distributions (over the last dimension).

    Element-wise, as in the paper's reference code::

        p_loss = F.kl_div(log_softmax(p), softmax(q), reduction="none")   # Q * (log Q - log P): KL(Q || P) terms
        q_loss = F.kl_div(log_softmax(q), softmax(p), reduction="none")   # P * (log P - log Q): KL(P || Q) terms
        masked_fill_(pad_mask, 0) on both                                 # pad_mask: True where padding
        loss = (p_loss.sum() + q_loss.sum()) / 2

    With ``reduction="sum"`` (the default) this *is* the reference code.
    ``"batchmean"`` divides that sum by ``p_logits.shape[0]`` (KL per sample,
    like ``F.kl_div(..., reduction="batchmean")``; 1-D logits are one sample); ``"mean"`` divides it by
    the number of elements, masked ones included (like ``reduction="mean"``).

    ``pad_mask`` (bool, True = ignore) must broadcast to the logits' shape,
    e.g. ``[B, T, 1]`` for sequence logits ``[B, T, V]``.

    Precision: float16 / bfloat16 logits are converted to float32 first, and
    the log-softmax, the products and the sum run in float32 with autocast off;
    the loss is float32. In fp16 the sum overflows (a 4096 x 1000 batch's KL of
    about 1e5 is past 65504), and for two near-identical passes the terms
    ``Q (log Q - log P)`` cancel to a few units of u = 2^-8 (bf16): the reduced
    answer can be 100x the exact one, or negative. float32 and float64 logits
    are used as given (outside autocast), so float32 is the reference code
    bit for bit.

    Note on ``alpha``: with ``"sum"`` the KL term grows with the batch size
    (and the sequence length), while the cross-entropy is a mean over samples,
    so the weight ``alpha`` of ``CE + alpha * KL`` means something different at
    every batch size: doubling the batch doubles the KL term's pull. The
    paper's alphas assume the reference code (``"sum"``) and its batch sizes;
    ``"batchmean"`` makes ``alpha`` independent of the batch size.
    """
    _check_logits(p_logits, q_logits)
    if pad_mask is not None:
        _check_pad_mask(pad_mask, p_logits.shape)
    _check_reduction(reduction)
    with _kl_precision(p_logits, q_logits) as (p_logits, q_logits):
        p_loss = F.kl_div(F.log_softmax(p_logits, dim=-1), F.softmax(q_logits, dim=-1), reduction="none")
        q_loss = F.kl_div(F.log_softmax(q_logits, dim=-1), F.softmax(p_logits, dim=-1), reduction="none")
        if pad_mask is not None:
            p_loss = p_loss.masked_fill(pad_mask, 0.0)
            q_loss = q_loss.masked_fill(pad_mask, 0.0)
        loss = (p_loss.sum() + q_loss.sum()) / 2
    if reduction == "batchmean":
        return loss / p_logits.shape[0] if p_logits.dim() > 1 else loss
    if reduction == "mean":
        return loss / p_logits.numel()
    return loss


@dataclass(frozen=True)
class RDropParts:
    """The terms of the R-Drop loss: ``loss = ce + alpha * kl`` with ``ce = (ce1 + ce2) / 2``."""

    ce: torch.Tensor
    kl: torch.Tensor
    ce1: torch.Tensor
    ce2: torch.Tensor
    alpha: float


def rdrop_loss(
    logits1: torch.Tensor,
    logits2: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    pad_mask: torch.Tensor | None = None,
    reduction: str = "sum",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, RDropParts]:
    """``L = (CE(logits1, y) + CE(logits2, y)) / 2 + alpha * compute_kl_loss(logits1, logits2)``.

    Cross-entropy is ``F.cross_entropy`` (mean over samples) on the logits
    flattened to ``[-1, classes]`` and ``target`` flattened to ``[-1]`` (so
    ``[B, T, V]`` sequence logits work; use ``ignore_index=-100`` targets for
    padding there). ``pad_mask`` and ``reduction`` go to :func:`compute_kl_loss`.
    Returns ``(loss, RDropParts)``; gradients flow through both passes.
    """
    _check_logits(logits1, logits2)
    _check_kl_weight(alpha)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor of class indices, got {type(target).__name__}")
    if tuple(target.shape) != tuple(logits1.shape[:-1]):
        raise ValueError(f"target of shape {tuple(target.shape)} does not match logits of shape "
                         f"{tuple(logits1.shape)}; expected {tuple(logits1.shape[:-1])} (one class index per row)")
    classes = logits1.shape[-1]
    ce1 = F.cross_entropy(logits1.reshape(-1, classes), target.reshape(-1), label_smoothing=label_smoothing)
    ce2 = F.cross_entropy(logits2.reshape(-1, classes), target.reshape(-1), label_smoothing=label_smoothing)
    kl = compute_kl_loss(logits1, logits2, pad_mask=pad_mask, reduction=reduction)
    ce = 0.5 * (ce1 + ce2)
    return ce + alpha * kl, RDropParts(ce=ce, kl=kl, ce1=ce1, ce2=ce2, alpha=float(alpha))


@dataclass(frozen=True)
class RDropOutput:
    """What :func:`rdrop_forward` returns: the loss, its parts, and both passes' logits."""

    loss: torch.Tensor
    parts: RDropParts
    logits1: torch.Tensor
    logits2: torch.Tensor


def rdrop_forward(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    concat: bool = False,
    pad_mask: torch.Tensor | None = None,
    reduction: str = "sum",
) -> RDropOutput:
    """The two dropout passes of ``model`` on ``x`` and their R-Drop loss (no optimizer step).

    ``concat=False``: two forwards, ``model(x)`` then ``model(x)``.
    ``concat=True``: one forward of ``torch.cat([x, x])``, split in halves
    (the reference implementation's trick: one larger batch is usually faster
    than two small ones).

    Both give each sample two independent dropout masks, so the expected loss
    is the same. Single draws differ: (1) the random stream is consumed in a
    different order (one mask tensor of ``2B`` rows instead of two of ``B``),
    so the same seed gives different masks; (2) in training mode a BatchNorm
    updates its running statistics twice with two forwards, once with the
    concatenated batch (whose mean and biased variance are those of ``x``, so
    the normalization itself is the same). With dropout off (p = 0, or the
    model in eval mode) and BatchNorm frozen (eval mode), both give the same
    loss up to float rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    _check_kl_weight(alpha)
    _check_reduction(reduction)
    if not isinstance(target, torch.Tensor) or target.dim() < 1 or target.shape[0] != x.shape[0]:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must hold one class index per sample of x: got {got} for {x.shape[0]} samples")
    if concat:
        logits = model(torch.cat([x, x], dim=0))
        if logits.shape[0] != 2 * x.shape[0]:
            raise ValueError(f"concat=True needs a model that keeps the batch dimension first: "
                             f"{2 * x.shape[0]} inputs gave {logits.shape[0]} rows")
        logits1, logits2 = logits[: x.shape[0]], logits[x.shape[0]:]
    else:
        logits1, logits2 = model(x), model(x)
    loss, parts = rdrop_loss(logits1, logits2, target, alpha, pad_mask=pad_mask, reduction=reduction)
    return RDropOutput(loss=loss, parts=parts, logits1=logits1, logits2=logits2)


class RDropStep:
    """A ``step`` for :func:`fusionlib.train.fit`: ``step(model, x, y) -> (loss, logits1)`` via :func:`rdrop_forward`.

    Keeps every batch's terms in ``self.log`` (dicts with ``ce``, ``kl``,
    ``samples``); :meth:`epoch_means` averages them per epoch.
    """

    def __init__(self, alpha: float, concat: bool = True, reduction: str = "sum") -> None:
        _check_kl_weight(alpha)
        _check_reduction(reduction)
        self.alpha, self.concat, self.reduction = float(alpha), bool(concat), reduction
        self.log: list[dict[str, float]] = []

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = rdrop_forward(model, x, y, self.alpha, concat=self.concat, reduction=self.reduction)
        self.log.append({"ce": float(out.parts.ce.detach()), "kl": float(out.parts.kl.detach()),
                         "samples": int(y.numel())})
        return out.loss, out.logits1

    def epoch_means(self, steps_per_epoch: int) -> list[dict[str, float]]:
        """Per epoch, the sample-weighted means of ``ce`` and ``kl`` over its ``steps_per_epoch`` batches."""
        rows = []
        for start in range(0, len(self.log), steps_per_epoch):
            batch = self.log[start:start + steps_per_epoch]
            n = sum(b["samples"] for b in batch)
            rows.append({k: sum(b[k] * b["samples"] for b in batch) / n for k in ("ce", "kl")})
        return rows


def symmetric_kl_per_sample(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """``KL_sym`` of every row (no reduction): ``[N, C]`` logits -> ``[N]``; for logging and measurement.

    fp16 / bf16 logits are computed in float32, as in :func:`compute_kl_loss`.
    """
    _check_logits(logits1, logits2)
    with _kl_precision(logits1, logits2) as (logits1, logits2):
        lp, lq = F.log_softmax(logits1, dim=-1), F.log_softmax(logits2, dim=-1)
        return 0.5 * ((lp.exp() * (lp - lq)).sum(-1) + (lq.exp() * (lq - lp)).sum(-1))


def classifier_dropout(model: nn.Module) -> tuple[nn.Dropout, nn.Linear]:
    """The classifier's ``(Dropout, Linear)``: the last two children of the model's last ``nn.Sequential`` that ends so.

    Both course models end that way (``fc`` of ``models.resnet18(dropout=p)``,
    ``classifier`` of MobileNetV2); a model without such a head is an error.
    """
    for name, module in reversed(list(model.named_modules())):
        children = list(module.children()) if isinstance(module, nn.Sequential) else []
        if len(children) >= 2 and isinstance(children[-2], nn.Dropout) and isinstance(children[-1], nn.Linear):
            return children[-2], children[-1]
    raise ValueError(f"{type(model).__name__} has no classifier ending in nn.Sequential(..., nn.Dropout, nn.Linear); "
                     "build the course models with models.build(name, dropout=p)")


@dataclass(frozen=True)
class SubnetworkGap:
    """Agreement of a model's dropout sub-networks, on one test set (see :func:`subnetwork_gap`).

    ``full_accuracy``: the full network (eval mode); ``sub_accuracy``: the mean
    accuracy of single sub-networks; ``kl_sub_sub``: the mean symmetric KL per
    sample between two independent sub-networks; ``kl_sub_full``: between a
    sub-network and the full network.
    """

    full_accuracy: float
    sub_accuracy: float
    kl_sub_sub: float
    kl_sub_full: float


def subnetwork_gap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask_samples: int, seed: int = 0) -> SubnetworkGap:
    """How far the model's dropout sub-networks are from each other and from the full network.

    The dropout sits only in the classifier (:func:`classifier_dropout`), so
    the features ``h`` in front of it are computed once (eval mode) and
    ``mask_samples`` pairs of inverted-dropout masks ``m ~ Bernoulli(1 - p) / (1 - p)``
    are drawn from a generator seeded with ``seed``; each pair gives two
    sub-networks ``z_k = linear(h * m_k)``. Returns the means over the masks of
    the sub-network accuracy, of ``KL_sym(z_1, z_2)`` and of ``KL_sym(z_1, z_full)``
    (:func:`symmetric_kl_per_sample`, averaged over the samples).
    """
    if mask_samples < 1:
        raise ValueError(f"mask_samples must be at least 1, got {mask_samples}")
    drop, linear = classifier_dropout(model)
    captured: dict[str, torch.Tensor] = {}
    handle = drop.register_forward_hook(lambda module, inputs, output: captured.update(h=inputs[0]))
    was_training = model.training
    try:
        with torch.no_grad():
            full_logits = model.eval()(x)
    finally:
        handle.remove()
        model.train(was_training)
    h, p = captured["h"], drop.p
    generator = torch.Generator().manual_seed(seed)
    sub_acc, kl_subs, kl_full = [], [], []
    with torch.no_grad():
        for _ in range(mask_samples):
            masks = (torch.rand(2, *h.shape, generator=generator) >= p).to(h.dtype) / (1 - p)
            z1, z2 = linear(h * masks[0]), linear(h * masks[1])
            sub_acc.append(float((z1.argmax(1) == y).float().mean()))
            kl_subs.append(float(symmetric_kl_per_sample(z1, z2).mean()))
            kl_full.append(float(symmetric_kl_per_sample(z1, full_logits).mean()))
    return SubnetworkGap(full_accuracy=float((full_logits.argmax(1) == y).float().mean()),
                         sub_accuracy=sum(sub_acc) / mask_samples, kl_sub_sub=sum(kl_subs) / mask_samples,
                         kl_sub_full=sum(kl_full) / mask_samples)
