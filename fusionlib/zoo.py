"""Trained models for the notebooks, trained once and then served from a disk cache.

:func:`trained_model` trains a :mod:`fusionlib.models` builder on the digits
with :func:`fusionlib.train.fit` the first time it is asked for a set of
parameters, and stores the state dict and the metrics under
``{cache_dir()}/{name}-{cache_key(params)}.pt``; every later call with the same
parameters (in any notebook or process) loads that file instead. The key
hashes every training parameter, the torch and torchvision versions and
``CACHE_VERSION``, so a changed recipe never serves stale weights.

All names here are re-exported by :mod:`fusionlib.models`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import ResNet

from fusionlib.modules import set_submodule

__all__ = ["CACHE_VERSION", "DEFAULT_LR", "cache_dir", "cache_key", "load_cached", "save_cached", "cached_training",
           "trained_model", "trained_qat_model"]

T = TypeVar("T")

#: Bump when a builder, the data pipeline or the training recipe changes, so
#: old cache entries are not served for the new recipe.
CACHE_VERSION = 1

#: Peak learning rates of the one-cycle schedule, per model: chosen so that
#: the default 3 epochs train each model well on the digits.
DEFAULT_LR = {"resnet18": 0.03, "mobilenet_v2": 0.05, "rep_resnet18": 0.03, "rep_mobilenet_v2": 0.05}


def cache_dir() -> Path:
    """``$FUSIONLIB_CACHE``, else ``$XDG_CACHE_HOME/fusionlib``, else ``~/.cache/fusionlib``."""
    if os.environ.get("FUSIONLIB_CACHE"):
        return Path(os.environ["FUSIONLIB_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fusionlib"
    return Path.home() / ".cache" / "fusionlib"


def cache_key(params: dict[str, Any]) -> str:
    """SHA-256 (hex, first 16 digits) of the parameters, torch/torchvision versions and CACHE_VERSION."""
    payload = {
        "params": params,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cache_version": CACHE_VERSION,
    }
    text = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Seconds per epoch at 32x32 on one CPU thread of the course's reference machine (scaled by the pixel count for other sizes).
SECONDS_PER_EPOCH_32 = {"resnet18": 5.0, "mobilenet_v2": 6.0, "rep_resnet18": 6.0, "rep_mobilenet_v2": 8.0}


def training_seconds_estimate(name: str, epochs: int, image_size: int) -> float:
    """A rough training time: ``epochs * seconds_per_epoch(32x32) * (image_size / 32)^2``."""
    return epochs * SECONDS_PER_EPOCH_32.get(name, 6.0) * (image_size / 32) ** 2


def trained_model(
    name: str = "resnet18",
    epochs: int = 3,
    image_size: int = 32,
    seed: int = 0,
    batch_size: int = 64,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    channels: int = 3,
    small_input: bool = True,
    test_fraction: float = 0.2,
    progress: bool = True,
    use_cache: bool = True,
    dropout: float | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A model trained on the digits, from the disk cache when available.

    Trains ``build(name, num_classes=10, small_input=small_input)`` with
    :func:`fusionlib.train.fit` (SGD + Nesterov momentum, one-cycle schedule)
    on :func:`fusionlib.data.digits_loaders`. ``lr=None`` picks
    ``DEFAULT_LR[name]``. The state dict and metrics are cached in
    :func:`cache_dir` under ``{name}-{cache_key}.pt``, keyed by every parameter
    here except ``progress`` / ``use_cache``, plus the torch version; the file is
    written atomically (temporary file + rename). ``use_cache=False`` neither
    reads nor writes the cache.

    Returns ``(model.eval(), metrics)``; ``metrics`` has ``test_accuracy``
    (last epoch, in [0, 1]), ``train_seconds`` (of the run that trained it),
    ``epochs``, ``history`` (:func:`fit`'s rows), ``params``, ``key``,
    ``path`` and ``cached`` (True when loaded from disk).

    ``dropout`` (``resnet18`` / ``mobilenet_v2`` only) is passed to the builder
    (classifier dropout, see :func:`fusionlib.models.resnet18`); ``None`` builds
    the default model and leaves it out of the cache key, so the keys of calls
    without it are unchanged.
    """
    from fusionlib.data import digits_loaders
    from fusionlib.models import ALL_BUILDERS, BUILDERS, build  # here, not at the top: fusionlib.models re-exports this module
    from fusionlib.train import fit, seed_everything

    if name not in ALL_BUILDERS:
        raise ValueError(f"Unknown model name {name!r}; choose one of {sorted(ALL_BUILDERS)}.")
    params = {
        "name": name,
        "epochs": epochs,
        "image_size": image_size,
        "seed": seed,
        "batch_size": batch_size,
        "lr": DEFAULT_LR[name] if lr is None else float(lr),
        "momentum": momentum,
        "weight_decay": weight_decay,
        "channels": channels,
        "small_input": small_input,
        "test_fraction": test_fraction,
    }
    build_kwargs: dict[str, Any] = {}
    if dropout is not None:
        if name not in BUILDERS:
            raise ValueError(f"dropout is an option of resnet18 and mobilenet_v2, not of {name!r}")
        params["dropout"] = float(dropout)
        build_kwargs["dropout"] = float(dropout)
    key = cache_key(params)
    path = cache_dir() / f"{name}-{key}.pt"

    def fresh_model() -> nn.Module:
        seed_everything(seed)  # same initial weights on every run
        model = build(name, num_classes=10, small_input=small_input, **build_kwargs)
        if channels != 3:
            _set_input_channels(model, channels)
        return model

    def train(model: nn.Module) -> dict[str, Any]:
        if progress:
            print(f"Training {name} on the digits ({epochs} epoch(s), {image_size}x{image_size}, seed {seed}): "
                  f"not in the cache {cache_dir()} yet. About {training_seconds_estimate(name, epochs, image_size):.0f} s "
                  f"on one CPU thread; later calls with these parameters load it in a moment.")
        train_loader, test_loader = digits_loaders(
            batch_size=batch_size, image_size=image_size, channels=channels, test_fraction=test_fraction, seed=seed
        )
        start = time.perf_counter()
        history = fit(model, train_loader, epochs, lr=params["lr"], seed=seed, test_loader=test_loader,
                      progress=progress, momentum=momentum, weight_decay=weight_decay)
        return {"test_accuracy": history[-1]["test_acc"], "train_seconds": time.perf_counter() - start,
                "epochs": epochs, "history": history, "params": params, "key": key}

    return cached_training(path, fresh_model, train, use_cache)


def cached_training(
    path: Path,
    fresh_model: Callable[[], nn.Module],
    train: Callable[[nn.Module], dict[str, Any]],
    use_cache: bool = True,
    restored: Callable[[nn.Module], object] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model.eval(), metrics)``: ``fresh_model()`` with the state dict cached at ``path``, else trained and cached.

    ``train(model)`` trains in place and returns the metrics; the state dict
    and metrics are then saved with :func:`save_cached` (unless ``use_cache``
    is False, which neither reads nor writes). ``restored(model)`` runs after
    a cached state dict is loaded (state that is not in it, e.g. a flag).
    ``metrics`` gets ``cached`` and ``path``. A stale or corrupt entry warns
    and is trained again (:func:`load_cached`).
    """
    def restore(entry: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        model = fresh_model()
        model.load_state_dict(entry["state_dict"])
        if restored is not None:
            restored(model)
        return model.eval(), dict(entry["metrics"], cached=True, path=str(path))

    cached = load_cached(path, restore) if use_cache else None
    if cached is not None:
        return cached
    model = fresh_model()
    metrics = train(model)
    model.eval()
    if use_cache:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_cached({"state_dict": state, "metrics": metrics}, path)
    return model, dict(metrics, cached=False, path=str(path))


def _set_input_channels(model: nn.Module, channels: int) -> None:
    """Replace the first conv so the model takes ``channels`` input channels (same name, same shape otherwise)."""
    name = "conv1" if isinstance(model, ResNet) else "features.0.0"
    old = model.get_submodule(name)
    new = nn.Conv2d(
        channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation, old.groups, old.bias is not None
    )
    set_submodule(model, name, new)


def load_cached(path: Path, restore: Callable[[dict[str, Any]], T]) -> T | None:
    """``restore(entry)`` for the cache file at ``path``, or None when there is none.

    A corrupt or stale file (unreadable, or ``restore`` fails on it, e.g. a
    state dict that no longer fits) warns and returns None, so the caller
    computes the entry again and overwrites it with :func:`save_cached`.
    """
    if not path.exists():
        return None
    try:
        return restore(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        warnings.warn(f"Ignoring unreadable cache entry {path} ({exc.__class__.__name__}: {exc}); computing it again.")
        return None


def save_cached(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path`` (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------- QAT fine-tuning of the digits models, cached
#: Part of every trained_qat_model cache key: bump it when QAT's arithmetic changes.
QAT_CACHE_VERSION = 2

def trained_qat_model(
    name: str = "resnet18",
    weight_bits: int = 8,
    epochs: int = 1,
    lr: float = 0.005,
    freeze_bn_epoch: int | None = None,
    calib_batches: int = 4,
    learn_amax: bool = False,
    seed: int = 0,
    fp32_epochs: int = 3,
    image_size: int = 32,
    progress: bool = True,
    use_cache: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """A digits model fine-tuned with QAT from its fp32 checkpoint (:func:`fusionlib.trained_model`), cached.

    Steps: ``prepare_qat`` (per-channel ``weight_bits`` weights, 8-bit
    activations), ``calibrate`` (max, ``calib_batches`` training batches: the
    PTQ starting point), then :func:`fusionlib.train.fit` for ``epochs`` with
    peak rate ``lr``, BatchNorm training with batch statistics and the
    running-statistics correction. ``freeze_bn_epoch=k`` freezes the
    statistics after ``k`` epochs (``0``: from the start; ``None``: never in
    this run); the two parts are two :func:`fit` calls, each with its own
    one-cycle schedule. ``learn_amax``:
    the activation and weight amax are trained too (LSQ gradient). The state
    dict and metrics are cached in :func:`cache_dir` under
    ``qat-{name}-{key}.pt``, keyed by every parameter here except ``progress``
    / ``use_cache``, plus the torch version; written atomically.
    Returns ``(qat_model.eval(), metrics)``: ``ptq_accuracy`` (after
    calibration, before training), ``test_accuracy``, ``fp32_accuracy``,
    ``history``, ``train_seconds``, ``params``, ``cached``.
    """
    from fusionlib.data import digits_loaders
    from fusionlib.quant import QuantDescriptor
    from fusionlib.quant.ptq import calibrate
    from fusionlib.quant.qat import freeze_bn_stats, prepare_qat
    from fusionlib.train import evaluate, fit, seed_everything

    params = {"name": name, "weight_bits": int(weight_bits), "epochs": int(epochs), "lr": float(lr),
              "freeze_bn_epoch": freeze_bn_epoch, "calib_batches": int(calib_batches), "learn_amax": bool(learn_amax),
              "seed": int(seed), "fp32_epochs": int(fp32_epochs), "image_size": int(image_size),
              "qat_version": QAT_CACHE_VERSION}
    if not (isinstance(epochs, int) and epochs >= 0):
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if freeze_bn_epoch is not None and not (isinstance(freeze_bn_epoch, int) and freeze_bn_epoch >= 0):
        raise ValueError(f"freeze_bn_epoch must be None or an int >= 0, got {freeze_bn_epoch!r}")
    key = cache_key(params)
    path = cache_dir() / f"qat-{name}-{key}.pt"
    fp32, fp32_metrics = trained_model(name, epochs=fp32_epochs, image_size=image_size, seed=seed, progress=progress)
    train_loader, test_loader = digits_loaders(image_size=image_size, seed=seed)
    example = next(iter(test_loader))[0]
    quant_desc_weight = QuantDescriptor(num_bits=int(weight_bits), axis=0, learn_amax=bool(learn_amax))
    quant_desc_input = QuantDescriptor(num_bits=8, learn_amax=bool(learn_amax))

    frozen = freeze_bn_epoch is not None and freeze_bn_epoch <= epochs  # BN statistics frozen by the end

    def fresh() -> nn.Module:
        return prepare_qat(fp32, example, quant_desc_weight=quant_desc_weight, quant_desc_input=quant_desc_input)

    def train(gm: nn.Module) -> dict[str, Any]:
        seed_everything(seed)
        calibrate(gm, train_loader, num_batches=calib_batches)
        ptq_accuracy = evaluate(gm.eval(), test_loader)
        start = time.perf_counter()
        live = epochs if freeze_bn_epoch is None else min(freeze_bn_epoch, epochs)
        history = fit(gm, train_loader, live, lr=lr, seed=seed, test_loader=test_loader, progress=progress) if live else []
        if frozen:
            freeze_bn_stats(gm)
            if epochs > live:
                more = fit(gm, train_loader, epochs - live, lr=lr, seed=seed + 1, test_loader=test_loader, progress=progress)
                history += [dict(row, epoch=row["epoch"] + live) for row in more]
        return {"ptq_accuracy": ptq_accuracy, "test_accuracy": evaluate(gm.eval(), test_loader),
                "fp32_accuracy": fp32_metrics["test_accuracy"], "history": history,
                "train_seconds": time.perf_counter() - start, "params": params, "key": key}

    return cached_training(path, fresh, train, use_cache)  # freeze_bn is in the state dict
