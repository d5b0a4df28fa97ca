"""A small, CPU-friendly training loop with progress bars.

* :func:`seed_everything` seeds ``random``, NumPy and torch.
* :func:`fit` trains a classifier with cross-entropy, SGD with Nesterov
  momentum and a one-cycle learning-rate schedule (warm up to ``lr``, then
  cosine-anneal towards zero), and returns one history row per epoch.
* :func:`evaluate` returns top-1 accuracy in [0, 1].
* :func:`eval_mode` (from :mod:`fusionlib.modules`, re-exported here) switches
  models to eval mode for a ``with`` block and restores every module's flag.

:func:`fusionlib.zoo.trained_model` uses :func:`fit` to train the course's
models on the digits, with per-model learning rates (``zoo.DEFAULT_LR``).

Threads: on a machine whose cores are busy with other work, one thread
(``torch.set_num_threads(1)``) can be faster than several, because OpenMP
threads wait for each other at every op; compare both where you run.
"""
from __future__ import annotations

import random
import time
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from fusionlib.arguments import check_positive_int
from fusionlib.display import progress as progress_bar
from fusionlib.modules import eval_mode

__all__ = ["seed_everything", "fit", "evaluate", "eval_mode"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and, if present, CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (batches of ``(x, y)``), in [0, 1].

    Runs in eval mode under ``torch.inference_mode()`` and restores every
    module's previous training flag afterwards.
    """
    device = _model_device(model)
    correct, total = 0, 0
    with eval_mode(model), torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += int(y.numel())
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return correct / total


def fit(
    model: nn.Module,
    train_loader,
    epochs: int,
    lr: float = 0.05,
    seed: int = 0,
    test_loader=None,
    progress: bool = True,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.0,
    step: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[dict]:
    """Train ``model`` in place for ``epochs`` epochs and return its history.

    Optimizer: SGD, Nesterov momentum ``momentum``, weight decay
    ``weight_decay``. Schedule: ``OneCycleLR`` stepped per batch -- the rate
    rises from ``lr / 25`` to ``lr`` over the first 30% of steps, then
    cosine-anneals to ~0. Loss: cross-entropy.

    Each history row: ``epoch`` (1-based), ``train_loss`` (mean over samples),
    ``train_acc`` (accuracy on the training batches, in train mode, as seen while
    training), ``seconds`` (training time of the epoch, evaluation excluded), and
    ``test_acc`` when ``test_loader`` is given. ``progress=False`` disables the
    tqdm bars (they use ``leave=False``, so a notebook keeps only the epoch bar).
    The model is left in train mode.

    ``step(model, x, y) -> (loss, logits)``, when given, replaces the default
    ``loss = cross_entropy(model(x), y)`` (e.g. :class:`fusionlib.rdrop.RDropStep`,
    two dropout passes and a KL term); ``logits`` feed ``train_acc`` and
    ``train_loss`` is then that step's loss.
    """
    check_positive_int("epochs", epochs)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("fit: train_loader is empty")

    seed_everything(seed)
    device = _model_device(model)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=0.3
    )

    history: list[dict] = []
    epoch_bar = progress_bar(range(1, epochs + 1), total=epochs, desc="epochs", enabled=progress, leave=True)
    for epoch in epoch_bar:
        model.train()
        start = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in progress_bar(train_loader, total=steps_per_epoch, desc=f"epoch {epoch}", enabled=progress, leave=False):
            x, y = x.to(device), y.to(device)
            if step is None:
                logits = model(x)
                loss = loss_fn(logits, y)
            else:
                loss, logits = step(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * y.numel()
            correct += int((logits.detach().argmax(dim=1) == y).sum())
            seen += int(y.numel())
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "seconds": time.perf_counter() - start,
        }
        if test_loader is not None:
            row["test_acc"] = evaluate(model, test_loader)
        history.append(row)
        if progress:
            epoch_bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"})
    model.train()
    return history


def recalibrate_batchnorm(model: nn.Module, loader: Iterable, num_batches: int | None = None) -> nn.Module:
    """Recompute every BatchNorm's running statistics from ``loader`` ("precise BN"), in place.

    During training, ``running_mean`` / ``running_var`` are exponential moving
    averages (``r <- (1 - momentum) * r + momentum * batch_stat``) of
    statistics taken while the weights were still changing, so they can lag
    the final network; eval mode then normalizes with the wrong numbers. This
    resets them and, with ``momentum=None`` (torch's cumulative average),
    sets each to the plain average over the first ``num_batches`` batches
    (all when ``None``) of the *final* weights' batch statistics:

        running_mean = (1/B) * sum_b mean_b,   running_var = (1/B) * sum_b var_b (unbiased)

    Only BatchNorm layers run in training mode (dropout and the rest stay in
    eval); no gradients; every module's training flag and momentum are
    restored. Returns ``model``. Batches are ``(x, y)`` pairs or plain inputs.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError(f"recalibrate_batchnorm: {type(model).__name__} has no BatchNorm layer")
    if num_batches is not None:
        check_positive_int("num_batches", num_batches, "or None (every batch)")
    untracked = [m for m in norms if not m.track_running_stats]
    if untracked:
        raise ValueError(f"recalibrate_batchnorm: {len(untracked)} BatchNorm layer(s) do not track running "
                         f"statistics (track_running_stats=False); there is nothing to recalibrate")
    momenta = [m.momentum for m in norms]
    device = _model_device(model)
    seen = 0
    with eval_mode(model), torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.training = True
        try:
            for batch in loader:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
                seen += 1
                if num_batches is not None and seen >= num_batches:
                    break
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
    if seen == 0:
        raise ValueError("recalibrate_batchnorm: the loader yielded no batch")
    return model
