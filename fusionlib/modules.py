"""Small helpers for working on ``nn.Module`` trees, used by every technique.

* :func:`eval_mode` -- a context that switches models to eval mode and gives
  every submodule its own training flag back afterwards;
* :func:`require_eval_mode` -- a clear error naming the modules still in
  training mode (BatchNorm folding needs running statistics);
* :func:`set_submodule` -- ``root.<dotted.name> = new``, via torch's
  ``nn.Module.set_submodule``;
* :func:`carry_forward_hooks` / :func:`warn_dropped_hooks` -- the hook policy
  of every transform that replaces or removes a module: a replacement keeps
  the replaced module's forward pre-hooks and forward hooks; a hook on a
  module that disappears is named in a warning (or an error, where the
  transform cannot keep its meaning).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections import OrderedDict
from typing import Iterable, Iterator

import torch.fx as fx
from torch import nn

__all__ = ["eval_mode", "require_eval_mode", "set_submodule", "carry_forward_hooks", "warn_dropped_hooks",
           "hook_names", "hook_attributes", "attach_hook_dicts", "stacklevel_outside_fusionlib", "HOOK_KINDS",
           "HOOK_LABELS"]


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


# --------------------------------------------------------------------------
# The hook policy: replaced modules hand their hooks on, removed ones say so
# --------------------------------------------------------------------------
#: Hook kinds -> the attributes torch keeps them in: an OrderedDict {handle id: hook} first,
#: then the flag dicts (with_kwargs, always_call) keyed by the same ids.
HOOK_KINDS: dict[str, tuple[str, ...]] = {
    "forward_pre": ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"),
    "forward": ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "backward_pre": ("_backward_pre_hooks",),
    "backward": ("_backward_hooks",),
}
HOOK_LABELS = {"forward_pre": "forward pre-hook", "forward": "forward hook",
           "backward_pre": "backward pre-hook", "backward": "backward hook"}


def hook_names(module: nn.Module, kinds: Iterable[str] = tuple(HOOK_KINDS)) -> list[str]:
    """``["forward hook 'log'", ...]``: the hooks of ``module`` of these kinds (keys of ``HOOK_KINDS``), in order."""
    return [f"{HOOK_LABELS[kind]} {getattr(hook, '__qualname__', None) or repr(hook)!r}"
            for kind in kinds for hook in getattr(module, HOOK_KINDS[kind][0], {}).values()]


def hook_attributes(kinds: Iterable[str] = tuple(HOOK_KINDS)) -> tuple[str, ...]:
    """The module attributes holding hooks of these kinds (hook dicts, then their flag dicts)."""
    return tuple(attr for kind in kinds for attr in HOOK_KINDS[kind])


def attach_hook_dicts(new: nn.Module, hook_dicts: dict, kinds: Iterable[str]) -> None:
    """Give ``new`` the hook dicts ``{attribute: OrderedDict}`` of these kinds, before any it already has.

    Where ``new`` has none of a kind, the dict object itself moves, so the handles
    ``register_forward_hook`` & co. returned still remove the hooks.
    """
    for attr in hook_attributes(kinds):
        theirs, mine = hook_dicts.get(attr), getattr(new, attr, None)
        if theirs:
            setattr(new, attr, theirs if not mine else OrderedDict([*theirs.items(), *mine.items()]))


def carry_forward_hooks(old: nn.Module, new: nn.Module, name: str = "", *,
                        kinds: tuple[str, ...] = ("forward_pre", "forward")) -> None:
    """Move the forward pre-hooks and forward hooks of ``old`` onto ``new``, its replacement.

    ``with_kwargs`` / ``always_call`` flags come along, and the hooks run in
    the order they were registered (``old``'s before any ``new`` already had).
    Where ``new`` has no hooks of a kind, it takes ``old``'s dict itself, so the
    handles ``register_forward_hook`` returned still remove them; ``old`` is
    left without them (a replaced module that lives on inside its replacement
    does not run them twice). ``kinds`` narrows what moves (a fused group takes
    the first module's pre-hooks and the last one's forward hooks); every
    other hook of ``old``, backward hooks included, is named in a warning
    (:func:`warn_dropped_hooks`), with ``name``, the module's name in its model.
    """
    if old is new:
        return
    attach_hook_dicts(new, {attr: getattr(old, attr, None) for attr in hook_attributes(kinds)}, kinds)
    for attr in hook_attributes(kinds):
        if getattr(old, attr, None):
            setattr(old, attr, OrderedDict())
    others = tuple(k for k in HOOK_KINDS if k not in kinds)
    warn_dropped_hooks(old, name or "<module>", f"it is replaced by a {type(new).__name__}, which takes only its "
                       + " and ".join(f"{HOOK_LABELS[k]}s" for k in kinds), kinds=others)


def stacklevel_outside_fusionlib() -> int:
    """The ``warnings`` stacklevel of the first caller outside the fusionlib package."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def warn_dropped_hooks(module: nn.Module, name: str, why: str, *, error: bool = False,
                       kinds: Iterable[str] = tuple(HOOK_KINDS)) -> None:
    """Name every hook of ``module`` (called ``name`` in its model) that a transform drops, and why.

    One ``UserWarning`` per hook; with ``error=True`` a ``ValueError`` listing
    them instead (the transform cannot keep the hooks' meaning, so it must not
    run). Nothing happens when the module has no hooks of these ``kinds``.
    """
    hooks = hook_names(module, kinds)
    if not hooks:
        return
    if error:
        raise ValueError(f"'{name}' ({type(module).__name__}) carries {', '.join(hooks)}, which cannot be kept: "
                         f"{why}. Remove the hooks (handle.remove()) and register them again afterwards.")
    for hook in hooks:
        warnings.warn(f"The {hook} on '{name}' ({type(module).__name__}) is dropped: {why}. Register it on "
                      "the module that replaces it if you still need it.", UserWarning,
                      stacklevel=stacklevel_outside_fusionlib())
