"""Small helpers for working on ``nn.Module`` trees, used by every technique.

* :func:`eval_mode` -- a context that switches models to eval mode and gives
  every submodule its own training flag back afterwards;
* :func:`require_eval_mode` -- a clear error naming the modules still in
  training mode (BatchNorm folding needs running statistics);
* :func:`set_submodule` -- ``root.<dotted.name> = new``, via torch's
  ``nn.Module.set_submodule``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.fx as fx
from torch import nn

__all__ = ["eval_mode", "require_eval_mode", "set_submodule"]


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


def require_eval_mode(model: nn.Module, what: str, because: str) -> None:
    """Raise ``ValueError`` naming the modules in training mode; ``because`` says why it matters."""
    if isinstance(model, fx.GraphModule):  # control flow is fixed: only the modules it calls matter
        called = dict.fromkeys(n.target for n in model.graph.nodes if n.op == "call_module")
        training = [name for name in called if model.get_submodule(name).training]
    else:  # tracing would bake the training-mode branches of every forward into the graph
        training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(f"'{n}'" for n in training[:5])
        if len(training) > 5:
            shown += f" and {len(training) - 5} more"
        raise ValueError(
            f"{what} needs a model in eval mode: {because}. '{type(model).__name__}' has modules in "
            f"training mode ({shown}); call model.eval() first.")


def set_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    """``root.<qualname> = new`` for a dotted name (``layer1.0.conv1``), with torch's ``set_submodule``."""
    root.set_submodule(qualname, new)
