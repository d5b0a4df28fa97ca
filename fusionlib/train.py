"""A small, CPU-friendly training loop with progress bars.

* :func:`seed_everything` seeds ``random``, NumPy and torch.
* :func:`fit` trains a classifier with cross-entropy, SGD with Nesterov
  momentum and a one-cycle learning-rate schedule (warm up to ``lr``, then
  cosine-anneal towards zero), and returns one history row per epoch.
* :func:`evaluate` returns top-1 accuracy in [0, 1].

With ``momentum=0.9``, ``weight_decay=5e-4`` and one-cycle, three epochs
train ResNet18 (``lr=0.03``) to ~97-98% and MobileNetV2 (``lr=0.05``) to
~96% test accuracy on the digits; see :func:`fusionlib.models.trained_model`.

On a busy machine (other processes on the same cores), one thread
(``torch.set_num_threads(1)``) can be several times faster than two: the
OpenMP threads wait for each other at every op.
"""
from __future__ import annotations

import contextlib
import random
import time
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and, if present, CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _progress(iterable: Iterable, total: int | None, desc: str, enabled: bool, leave: bool):
    from tqdm import tqdm  # plain text bars: no ipywidgets needed, readable in saved notebooks

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=leave, dynamic_ncols=True)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode; on exit give every submodule back its own training flag.

    Restoring per submodule (not ``model.train()``) keeps deliberately frozen
    parts, e.g. a BatchNorm held in eval inside a training model, as they were.
    Submodules without a ``training`` flag (parts of a frozen TorchScript
    module) are left alone.
    """
    flags = [(m, m.training) for model in models for m in model.modules() if hasattr(m, "training")]
    try:
        for module, _ in flags:
            module.training = False
        yield
    finally:
        for module, training in flags:
            module.training = training


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
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
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
    epoch_bar = _progress(range(1, epochs + 1), epochs, "epochs", progress, leave=True)
    for epoch in epoch_bar:
        model.train()
        start = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in _progress(train_loader, steps_per_epoch, f"epoch {epoch}", progress, leave=False):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = loss_fn(logits, y)
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
