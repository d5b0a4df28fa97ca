"""Every trained model of the course, trained once and then served from a disk cache.

One call, :func:`trained_model`, with the technique as a parameter::

    zoo.trained_model("resnet18", epochs=3)                         # plain training on the digits
    zoo.trained_model("resnet18", "rdrop", alpha=1.0)               # R-Drop (alpha = 0: the same run, one pass)
    zoo.trained_model("resnet18", "qat", weight_bits=4)             # QAT fine-tuning of the plain checkpoint
    zoo.trained_model("resnet18", "lora", shift="invert", r=4)      # LoRA adapters on a shifted task
    zoo.trained_model("resnet18", "pipeline", equalize=True)        # QAT of rep_resnet18 reparameterized, folded, equalized

Each technique is a *recipe* (:data:`RECIPES`): a function of the run's
parameters returning a :class:`Run` — the cache path, a fresh untrained
model, and how to train it. :func:`cached_training` then loads
``{cache_dir()}/{prefix}{name}-{cache_key(params)}.pt`` or trains and writes
it atomically. The key hashes every training parameter, the torch and
torchvision versions and ``CACHE_VERSION``, so a changed recipe never serves
stale weights. A read-only cache (a shared folder an instructor filled
with ``make cache``, named by ``FUSIONLIB_CACHE``) that lacks an entry trains
it into the user's private cache (:func:`private_cache_dir`) and says so. The technique modules (:mod:`fusionlib.rdrop`,
:mod:`fusionlib.lora`, :mod:`fusionlib.quant`) hold the arithmetic and the
training steps; the data loading, training schedules and caching live here.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import ResNet

from fusionlib import lora, rdrop
from fusionlib.data import digits_loaders
from fusionlib.models import ALL_BUILDERS, BUILDERS, build
from fusionlib.modules import set_submodule
from fusionlib.train import evaluate, fit, seed_everything

__all__ = ["CACHE_VERSION", "DEFAULT_LR", "PIPELINE_CACHE_VERSION", "RECIPES", "Run", "cache_dir", "cache_key",
           "load_cached", "save_cached", "cached_training", "trained_model", "pipeline_steps", "private_cache_dir",
           "writable_dir"]

T = TypeVar("T")

#: Bump when a builder, the data pipeline or the training recipe changes, so
#: old cache entries are not served for the new recipe.
CACHE_VERSION = 1

#: Peak learning rates of the one-cycle schedule, per model: chosen so that
#: the default 3 epochs train each model well on the digits.
DEFAULT_LR = {"resnet18": 0.03, "mobilenet_v2": 0.05, "rep_resnet18": 0.03, "rep_mobilenet_v2": 0.05}

#: Part of every QAT cache key: bump it when QAT's arithmetic changes.
QAT_CACHE_VERSION = 2


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


@dataclass
class Run:
    """One cacheable training run: where it is cached, how to build the untrained model, how to train it.

    ``train(model)`` trains in place and returns the metrics. ``state(model)``
    is what is saved (the whole state dict; LoRA: the adapters only) and
    ``load(model, entry)`` puts a cached entry back. ``extra_metrics`` are
    added to the metrics on every return (not cached: e.g. the base model's
    accuracy, which its own cache entry holds).
    """

    path: Path
    fresh_model: Callable[[], nn.Module]
    train: Callable[[nn.Module], dict[str, Any]]
    state: Callable[[nn.Module], dict[str, Any]] = field(default=lambda model: {"state_dict": _detached_state(model)})
    load: Callable[[nn.Module, dict[str, Any]], None] = field(
        default=lambda model, entry: model.load_state_dict(entry["state_dict"]))
    extra_metrics: dict[str, Any] = field(default_factory=dict)


def _detached_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_model(
    name: str = "resnet18",
    technique: str = "plain",
    *,
    progress: bool = True,
    use_cache: bool = True,
    **recipe: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model.eval(), metrics)``: ``name`` trained with ``technique`` on the digits, from the disk cache when there.

    ``technique`` is a key of :data:`RECIPES` (``"plain"``, ``"rdrop"``,
    ``"qat"``, ``"lora"``); ``recipe`` holds that recipe's parameters (see
    :func:`plain_run`, :func:`rdrop_run`, :func:`qat_run`, :func:`lora_run`).
    ``progress`` prints what trains and shows bars; ``use_cache=False``
    neither reads nor writes the cache. Every ``metrics`` has
    ``test_accuracy``, ``train_seconds``, ``history``, ``params``, ``key``,
    ``path`` and ``cached`` (True when loaded from disk).
    """
    if technique not in RECIPES:
        raise ValueError(f"unknown technique {technique!r}; choose one of {sorted(RECIPES)}")
    run = RECIPES[technique](name, progress=progress, **recipe)
    return cached_training(run, use_cache)


def cached_training(run: Run, use_cache: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """``(model.eval(), metrics)``: ``run.fresh_model()`` with the entry cached at ``run.path``, else trained and cached.

    A stale or corrupt entry warns and is trained again (:func:`load_cached`).
    When the cache folder is read-only (a shared cache an instructor filled,
    ``FUSIONLIB_CACHE``) and lacks the entry, the run is served from, or
    trained into, the same file name under :func:`private_cache_dir`, with a
    message saying where; nothing is written to the read-only folder.
    ``metrics`` gets ``cached``, ``path`` (where the entry is) and ``run.extra_metrics``.
    """
    def restore_from(path: Path) -> Callable[[dict[str, Any]], tuple[nn.Module, dict[str, Any]]]:
        def restore(entry: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
            model = run.fresh_model()
            run.load(model, entry)
            return model.eval(), dict(entry["metrics"], **run.extra_metrics, cached=True, path=str(path))
        return restore

    path = run.path
    cached = load_cached(path, restore_from(path)) if use_cache else None
    if cached is not None:
        return cached
    if use_cache and not writable_dir(path.parent):
        path = private_path(run.path)
        cached = load_cached(path, restore_from(path))
        if cached is not None:
            return cached
        print(f"The model cache {run.path.parent} is read-only and has no {run.path.name}: training it into your "
              f"private cache {path.parent} instead.", flush=True)
    model = run.fresh_model()
    metrics = run.train(model)
    model.eval()
    if use_cache:
        save_cached({**run.state(model), "metrics": metrics}, path)
    return model, dict(metrics, **run.extra_metrics, cached=False, path=str(path))


def writable_dir(folder: Path) -> bool:
    """True when a file can be created in ``folder`` (made when missing): a probe file is created and removed.

    A probe, not ``os.access``: root passes every permission check, and a
    read-only mount or an immutable folder refuses root too.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
        return True
    except OSError:
        return False


def private_cache_dir() -> Path:
    """Where a user's models go when :func:`cache_dir` is read-only.

    ``$XDG_CACHE_HOME/fusionlib``, else ``~/.cache/fusionlib`` (the default
    cache); when that is the read-only folder itself, ``fusionlib-cache-<user id>``
    in the temporary directory.
    """
    base = os.environ.get("XDG_CACHE_HOME")
    private = (Path(base).expanduser() if base else Path.home() / ".cache") / "fusionlib"
    if private.resolve() == cache_dir().resolve():
        uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
        private = Path(tempfile.gettempdir()) / f"fusionlib-cache-{uid}"
    return private


def private_path(path: Path) -> Path:
    """``path`` (an entry of :func:`cache_dir`) moved to :func:`private_cache_dir`, same relative name."""
    try:
        relative = path.relative_to(cache_dir())
    except ValueError:
        relative = Path(path.name)
    return private_cache_dir() / relative


# ---------------------------------------------------------------------- the recipes
def plain_run(
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
    dropout: float | None = None,
    progress: bool = True,
) -> Run:
    """Plain training: ``build(name, num_classes=10, small_input=small_input)`` on the digits, cached as ``{name}-{key}.pt``.

    :func:`fusionlib.train.fit` (SGD + Nesterov momentum, one-cycle schedule
    peaking at ``lr``; ``None`` picks ``DEFAULT_LR[name]``) on
    :func:`fusionlib.data.digits_loaders`. Keyed by every parameter here
    except ``progress``. ``dropout`` (``resnet18`` / ``mobilenet_v2`` only) is
    the builder's classifier dropout; ``None`` builds the default model and
    leaves it out of the key, so the keys of calls without it are unchanged.
    """
    params = _plain_params(name, epochs, image_size, seed, batch_size, lr, momentum, weight_decay, channels,
                           small_input, test_fraction, dropout)
    key = cache_key(params)
    build_kwargs = {"dropout": params["dropout"]} if "dropout" in params else {}

    def fresh_model() -> nn.Module:
        seed_everything(seed)  # same initial weights on every run
        model = build(name, num_classes=10, small_input=small_input, **build_kwargs)
        if channels != 3:
            _set_input_channels(model, channels)
        return model

    def train(model: nn.Module) -> dict[str, Any]:
        if progress:
            _announce_training(name, epochs, image_size, seed)
        train_loader, test_loader = digits_loaders(
            batch_size=batch_size, image_size=image_size, channels=channels, test_fraction=test_fraction, seed=seed
        )
        start = time.perf_counter()
        history = fit(model, train_loader, epochs, lr=params["lr"], seed=seed, test_loader=test_loader,
                      progress=progress, momentum=momentum, weight_decay=weight_decay)
        return {"test_accuracy": history[-1]["test_acc"], "train_seconds": time.perf_counter() - start,
                "epochs": epochs, "history": history, "params": params, "key": key}

    return Run(cache_dir() / f"{name}-{key}.pt", fresh_model, train)


def _plain_params(name: str, epochs: int, image_size: int, seed: int, batch_size: int, lr: float | None,
                  momentum: float, weight_decay: float, channels: int, small_input: bool, test_fraction: float,
                  dropout: float | None) -> dict[str, Any]:
    """The plain run's cache-key parameters (``dropout`` only when given, ``lr`` resolved), checked."""
    if name not in ALL_BUILDERS:
        raise ValueError(f"Unknown model name {name!r}; choose one of {sorted(ALL_BUILDERS)}.")
    params = {"name": name, "epochs": epochs, "image_size": image_size, "seed": seed, "batch_size": batch_size,
              "lr": DEFAULT_LR[name] if lr is None else float(lr), "momentum": momentum,
              "weight_decay": weight_decay, "channels": channels, "small_input": small_input,
              "test_fraction": test_fraction}
    if dropout is not None:
        if name not in BUILDERS:
            raise ValueError(f"dropout is an option of resnet18 and mobilenet_v2, not of {name!r}")
        params["dropout"] = float(dropout)
    return params


def _announce_training(name: str, epochs: int, image_size: int, seed: int) -> None:
    print(f"Training {name} on the digits ({epochs} epoch(s), {image_size}x{image_size}, seed {seed}): "
          f"not in the cache {cache_dir()} yet. About {training_seconds_estimate(name, epochs, image_size):.0f} s "
          f"on one CPU thread; later calls with these parameters load it in a moment.")


def rdrop_run(
    name: str = "resnet18",
    alpha: float = 0.0,
    epochs: int = 3,
    batch_size: int = 64,
    seed: int = 0,
    image_size: int = 32,
    dropout: float = 0.2,
    lr: float | None = None,
    concat: bool = True,
    reduction: str = "batchmean",
    progress: bool = True,
) -> Run:
    """``build(name, dropout=dropout)`` trained with R-Drop (``alpha > 0``) or without; cached as ``rdrop-{name}-{key}.pt``.

    The plain recipe's schedule (``lr=None`` -> ``DEFAULT_LR[name]``); with
    ``alpha > 0`` every step is an :class:`fusionlib.rdrop.RDropStep` (two
    passes, ``concat``, ``reduction``); ``alpha == 0`` is one pass of
    cross-entropy. Metrics add ``seconds_per_epoch`` and, for R-Drop, ``ce``
    and ``kl`` per epoch in ``history``.
    """
    if name not in BUILDERS:
        raise ValueError(f"Unknown model name {name!r}; choose one of {sorted(BUILDERS)}.")
    rdrop.RDropStep(alpha, concat=concat, reduction=reduction)  # checks alpha and reduction before anything runs
    params = {"kind": "rdrop_run", "name": name, "alpha": float(alpha), "epochs": epochs, "batch_size": batch_size,
              "seed": seed, "image_size": image_size, "dropout": float(dropout),
              "lr": DEFAULT_LR[name] if lr is None else float(lr),
              "concat": bool(concat) if alpha > 0 else None, "reduction": reduction if alpha > 0 else None}
    key = cache_key(params)

    def fresh_model() -> nn.Module:
        seed_everything(seed)
        return build(name, num_classes=10, small_input=True, dropout=float(dropout))

    def train(model: nn.Module) -> dict[str, Any]:
        train_loader, test_loader = digits_loaders(batch_size=batch_size, image_size=image_size, seed=seed)
        step = rdrop.RDropStep(alpha, concat=concat, reduction=reduction) if alpha > 0 else None
        start = time.perf_counter()
        history = fit(model, train_loader, epochs, lr=params["lr"], seed=seed, test_loader=test_loader,
                      progress=progress, step=step)
        seconds = time.perf_counter() - start
        if step is not None:
            for row, terms in zip(history, step.epoch_means(len(train_loader))):
                row.update(terms)
        return {"test_accuracy": history[-1]["test_acc"], "train_seconds": seconds,
                "seconds_per_epoch": sum(r["seconds"] for r in history) / len(history),
                "history": history, "params": params, "key": key}

    return Run(cache_dir() / f"rdrop-{name}-{key}.pt", fresh_model, train)


def qat_run(
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
    weight_per_channel: bool = True,
    activation_bits: int = 8,
) -> Run:
    """The plain checkpoint (``fp32_epochs``) fine-tuned with QAT; cached as ``qat-{name}-{key}.pt``.

    Steps: :func:`fusionlib.quant.qat.prepare_qat` (``weight_bits`` weights,
    one amax per output channel, or per tensor with ``weight_per_channel=False``;
    ``activation_bits`` activations, per tensor), ``calibrate`` (max,
    ``calib_batches`` training batches: the PTQ starting point), then
    :func:`fusionlib.train.fit` for ``epochs`` with peak rate ``lr``, BatchNorm
    training with batch statistics and the running-statistics correction.
    ``freeze_bn_epoch=k`` freezes the statistics after ``k`` epochs (``0``:
    from the start; ``None``: never in this run); the two parts are two
    :func:`fit` calls, each with its own one-cycle schedule. ``learn_amax``:
    the activation and weight amax are trained too (LSQ gradient). Metrics add
    ``ptq_accuracy`` (after calibration, before training) and ``fp32_accuracy``.
    """
    from fusionlib.quant import QuantDescriptor  # here: the plain runs do not load the quantization toolkit
    from fusionlib.quant.ptq import calibrate
    from fusionlib.quant.qat import prepare_qat

    if not (isinstance(epochs, int) and epochs >= 0):
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if freeze_bn_epoch is not None and not (isinstance(freeze_bn_epoch, int) and freeze_bn_epoch >= 0):
        raise ValueError(f"freeze_bn_epoch must be None or an int >= 0, got {freeze_bn_epoch!r}")
    params = {"name": name, "weight_bits": int(weight_bits), "epochs": int(epochs), "lr": float(lr),
              "freeze_bn_epoch": freeze_bn_epoch, "calib_batches": int(calib_batches), "learn_amax": bool(learn_amax),
              "seed": int(seed), "fp32_epochs": int(fp32_epochs), "image_size": int(image_size),
              "qat_version": QAT_CACHE_VERSION}
    # in the key only when not the default, so the runs cached before these two options keep their keys
    if not weight_per_channel:
        params["weight_per_channel"] = False
    if int(activation_bits) != 8:
        params["activation_bits"] = int(activation_bits)
    key = cache_key(params)
    fp32, fp32_metrics = trained_model(name, epochs=fp32_epochs, image_size=image_size, seed=seed, progress=progress)
    train_loader, test_loader = digits_loaders(image_size=image_size, seed=seed)
    example = next(iter(test_loader))[0]
    quant_desc_weight = QuantDescriptor(num_bits=int(weight_bits), axis=0 if weight_per_channel else None,
                                        learn_amax=bool(learn_amax))
    quant_desc_input = QuantDescriptor(num_bits=int(activation_bits), learn_amax=bool(learn_amax))

    def fresh_model() -> nn.Module:
        return prepare_qat(fp32, example, quant_desc_weight=quant_desc_weight, quant_desc_input=quant_desc_input)

    def train(gm: nn.Module) -> dict[str, Any]:
        seed_everything(seed)
        calibrate(gm, train_loader, num_batches=calib_batches)
        ptq_accuracy = evaluate(gm.eval(), test_loader)
        start = time.perf_counter()
        history = _fit_then_freeze_bn(gm, train_loader, test_loader, epochs, freeze_bn_epoch, lr, seed, progress)
        return {"ptq_accuracy": ptq_accuracy, "test_accuracy": evaluate(gm.eval(), test_loader),
                "fp32_accuracy": fp32_metrics["test_accuracy"], "history": history,
                "train_seconds": time.perf_counter() - start, "params": params, "key": key}

    return Run(cache_dir() / f"qat-{name}-{key}.pt", fresh_model, train)  # freeze_bn is in the state dict


def _fit_then_freeze_bn(gm: nn.Module, train_loader: DataLoader, test_loader: DataLoader, epochs: int,
                        freeze_bn_epoch: int | None, lr: float, seed: int, progress: bool) -> list[dict[str, Any]]:
    """``fit`` for ``min(freeze_bn_epoch, epochs)`` epochs, then BN statistics frozen and ``fit`` for the rest."""
    from fusionlib.quant.qat import freeze_bn_stats

    live = epochs if freeze_bn_epoch is None else min(freeze_bn_epoch, epochs)
    history = fit(gm, train_loader, live, lr=lr, seed=seed, test_loader=test_loader, progress=progress) if live else []
    if freeze_bn_epoch is not None and freeze_bn_epoch <= epochs:
        freeze_bn_stats(gm)
        if epochs > live:
            more = fit(gm, train_loader, epochs - live, lr=lr, seed=seed + 1, test_loader=test_loader, progress=progress)
            history += [dict(row, epoch=row["epoch"] + live) for row in more]
    return history


#: Part of every pipeline cache key (notebook 18): bump it when :mod:`fusionlib.pipeline`'s steps change.
PIPELINE_CACHE_VERSION = 1

_PIPELINE_STEPS: dict[tuple[str, str], Any] = {}   # pipeline_steps' results in this process: computed once


def pipeline_steps(name: str = "resnet18", *, epochs: int = 3, image_size: int = 32, seed: int = 0,
                   equalize: bool = True, cle_iterations: int = 20, progress: bool = True):
    """:func:`fusionlib.pipeline.float_steps` of the cached ``rep_{name}`` (BatchNorm recalibrated on its training split).

    ``name`` is ``resnet18`` / ``mobilenet_v2`` (or their ``rep_`` names). The
    re-parameterizable model comes from :func:`trained_model` (``epochs``,
    ``image_size``, ``seed``). Computed once per process and parameters;
    every call returns a deep copy, so a caller editing a model never changes
    another caller's. Returns a :class:`fusionlib.pipeline.FloatSteps`.
    """
    from fusionlib.pipeline import FloatSteps, check_recipe, float_steps   # here: it loads the quantization toolkit

    check_recipe(equalize, cle_iterations)
    rep_name = name if name.startswith("rep_") else f"rep_{name}"
    if rep_name not in ALL_BUILDERS:
        raise ValueError(f"the pipeline takes resnet18 or mobilenet_v2 (their rep_ versions), got {name!r}")
    rep, rep_metrics = trained_model(rep_name, epochs=epochs, image_size=image_size, seed=seed, progress=progress)
    key = cache_key({"kind": "pipeline_steps", "rep_key": rep_metrics["key"], "equalize": equalize,
                     "cle_iterations": cle_iterations, "version": PIPELINE_CACHE_VERSION})
    key = (rep_metrics["key"], key)
    if key not in _PIPELINE_STEPS:
        with_cle = [v for k, v in _PIPELINE_STEPS.items() if k[0] == key[0] and v.report is not None]
        if not equalize and with_cle:   # the steps before CLE are already there: no second recalibration
            done = with_cle[0]
            _PIPELINE_STEPS[key] = FloatSteps({k: done.models[k] for k in ("trained", "reparameterized", "folded")})
        else:
            train_loader, test_loader = digits_loaders(image_size=image_size, seed=seed)
            example = next(iter(test_loader))[0][:2]
            _PIPELINE_STEPS[key] = float_steps(rep, train_loader, example, equalize=equalize,
                                               cle_iterations=cle_iterations)
    return copy.deepcopy(_PIPELINE_STEPS[key])


def pipeline_run(
    name: str = "resnet18",
    weight_bits: int = 8,
    activation_bits: int = 8,
    weight_per_channel: bool = True,
    epochs: int = 1,
    lr: float = 0.002,
    calib_batches: int = 4,
    equalize: bool = True,
    cle_iterations: int = 20,
    seed: int = 0,
    fp32_epochs: int = 3,
    image_size: int = 32,
    progress: bool = True,
) -> Run:
    """QAT of the last float step of :func:`pipeline_steps` (notebook 18); cached as ``pipeline-{name}-{key}.pt``.

    The key holds the whole recipe: the re-parameterizable model's own key
    (its training), whether CLE ran and how long, the quantizers, the QAT
    schedule and :data:`PIPELINE_CACHE_VERSION` / :data:`QAT_CACHE_VERSION`,
    so a changed step never serves another recipe's weights. Steps:
    :func:`fusionlib.quant.qat.prepare_qat` (no BatchNorm is left, so every
    conv is a ``QATConv2d``; activations signed unless after a ReLU),
    ``calibrate`` (max, ``calib_batches`` training batches), then
    :func:`fusionlib.train.fit` for ``epochs`` at peak rate ``lr``. Metrics add
    ``start_accuracy`` (the float model QAT starts from) and ``ptq_accuracy``
    (after calibration, before training).
    """
    from fusionlib.quant import QuantDescriptor
    from fusionlib.quant.ptq import calibrate
    from fusionlib.quant.qat import prepare_qat

    from fusionlib.pipeline import check_recipe

    if not (isinstance(epochs, int) and epochs >= 0):
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    check_recipe(equalize, cle_iterations)
    base = name[4:] if name.startswith("rep_") else name
    if f"rep_{base}" not in ALL_BUILDERS:
        raise ValueError(f"the pipeline takes resnet18 or mobilenet_v2 (their rep_ versions), got {name!r}")
    steps_params = dict(epochs=fp32_epochs, image_size=image_size, seed=seed, equalize=equalize,
                        cle_iterations=cle_iterations, progress=progress)
    rep_key = trained_model(f"rep_{base}", epochs=fp32_epochs, image_size=image_size, seed=seed,
                            progress=progress)[1]["key"]   # the key of its training run: part of this one's
    params = {"kind": "pipeline", "name": base, "rep_key": rep_key, "equalize": bool(equalize),
              "cle_iterations": int(cle_iterations), "weight_bits": int(weight_bits),
              "activation_bits": int(activation_bits), "weight_per_channel": bool(weight_per_channel),
              "epochs": int(epochs), "lr": float(lr), "calib_batches": int(calib_batches), "seed": int(seed),
              "pipeline_version": PIPELINE_CACHE_VERSION, "qat_version": QAT_CACHE_VERSION}
    key = cache_key(params)
    train_loader, test_loader = digits_loaders(image_size=image_size, seed=seed)
    example = next(iter(test_loader))[0]
    quant_desc_weight = QuantDescriptor(num_bits=int(weight_bits), axis=0 if weight_per_channel else None)
    quant_desc_input = QuantDescriptor(num_bits=int(activation_bits))
    start_model: dict[str, nn.Module] = {}   # the float model QAT starts from, for its accuracy when training

    def fresh_model() -> nn.Module:
        start_model["last"] = pipeline_steps(base, **steps_params).last
        return prepare_qat(start_model["last"], example, quant_desc_weight=quant_desc_weight, quant_desc_input=quant_desc_input)

    def train(gm: nn.Module) -> dict[str, Any]:
        if progress:
            print(f"QAT of the {'equalized' if equalize else 'folded'} rep_{base} ({weight_bits}-bit weights, "
                  f"{activation_bits}-bit activations, {epochs} epoch(s)): not in the cache {cache_dir()} yet.", flush=True)
        seed_everything(seed)
        calibrate(gm, train_loader, num_batches=calib_batches)
        ptq_accuracy = evaluate(gm.eval(), test_loader)
        start = time.perf_counter()
        history = fit(gm, train_loader, epochs, lr=lr, seed=seed, test_loader=test_loader, progress=progress) if epochs else []
        return {"start_accuracy": evaluate(start_model["last"], test_loader), "ptq_accuracy": ptq_accuracy,
                "test_accuracy": evaluate(gm.eval(), test_loader), "history": history,
                "train_seconds": time.perf_counter() - start, "params": params, "key": key}

    return Run(cache_dir() / f"pipeline-{base}-{key}.pt", fresh_model, train)


def lora_run(
    name: str = "resnet18",
    shift: str = "invert",
    r: int = 4,
    alpha: float = 8.0,
    dropout: float = 0.0,
    epochs: int = 3,
    lr: float = 1e-2,
    batch_size: int = 64,
    base_epochs: int = 3,
    image_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> Run:
    """The plain checkpoint with LoRA adapters on every dense layer, fine-tuned on a shifted task; ``lora-{name}-{key}.pt``.

    The base is the plain run (``name``, ``base_epochs``, ``image_size``,
    ``seed``); :func:`fusionlib.lora.inject_lora` puts adapters on
    :func:`~fusionlib.lora.dense_layer_names`;
    :func:`~fusionlib.lora.fine_tune_lora` trains them on
    :func:`~fusionlib.lora.shifted_digits_tensors`. Only the adapters are
    cached, keyed also by the base model's key. The model comes back unfused,
    only the adapters trainable; metrics add ``base_test_accuracy`` (the base
    on the original task).
    """
    lora.LoRALinear(nn.Linear(1, 1), r, alpha, dropout)  # checks r, alpha and dropout before anything trains
    base, base_metrics = trained_model(name, epochs=base_epochs, image_size=image_size, seed=seed, progress=progress)
    params = {"name": name, "shift": shift, "r": r, "alpha": float(alpha), "dropout": float(dropout),
              "epochs": epochs, "lr": float(lr), "batch_size": batch_size, "base_epochs": base_epochs,
              "image_size": image_size, "seed": seed, "base_key": base_metrics["key"], "recipe": 1}
    key = cache_key(params)

    def fresh_model() -> nn.Module:
        seed_everything(seed)  # the same initial A on every run
        model = lora.inject_lora(base, lora.dense_layer_names(base), r, alpha, dropout, inplace=False).eval()
        return lora.mark_only_lora_as_trainable(model)

    def train(model: nn.Module) -> dict[str, Any]:
        x_train, y_train, x_test, y_test = lora.shifted_digits_tensors(shift, image_size, seed)
        if progress:
            print(f"Fine-tuning LoRA adapters (r={r}) of {name} on the '{shift}' digits for {epochs} epoch(s): not in "
                  f"the cache {cache_dir()} yet; about as long as training the base model.")
        start = time.perf_counter()
        history = lora.fine_tune_lora(model, x_train, y_train, epochs, lr, batch_size, seed)
        accuracy = evaluate(model, DataLoader(TensorDataset(x_test, y_test), batch_size=256))
        return {"test_accuracy": accuracy, "train_seconds": time.perf_counter() - start, "history": history,
                "params": params, "key": key}

    return Run(cache_dir() / f"lora-{name}-{key}.pt", fresh_model, train,
               state=lambda model: {"adapters": lora.lora_state_dict(model)}, load=_load_adapters,
               extra_metrics={"base_test_accuracy": base_metrics["test_accuracy"]})


def _load_adapters(model: nn.Module, entry: dict[str, Any]) -> None:
    missing, unexpected = model.load_state_dict(entry["adapters"], strict=False)
    if unexpected or any(k.endswith(("lora_A", "lora_B")) for k in missing):
        raise KeyError(f"adapters do not fit the model (unexpected {unexpected[:3]})")


#: The techniques :func:`trained_model` knows, each a function of its parameters returning a :class:`Run`.
RECIPES: dict[str, Callable[..., Run]] = {"plain": plain_run, "rdrop": rdrop_run, "qat": qat_run, "lora": lora_run,
                                          "pipeline": pipeline_run}


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
