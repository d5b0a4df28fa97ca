"""Tracing helpers: a symbolic_trace that explains its failures, leaf functions, a readable graph table.

``torch.fx.symbolic_trace`` runs ``forward`` once with *proxies* instead of tensors and
records every operation into a graph. It fails when Python needs a concrete value from a
proxy: ``if x.sum() > 0`` (control flow on data), ``len(x)``, ``range(x.shape[0])``...
The three ways out are

* ``concrete_args={"flag": False}``: fix an input that steers control flow;
* a *leaf module*: the tracer records one ``call_module`` node and does not look inside
  (``symbolic_trace(model, leaf_modules=[MyBlock])``, i.e. a Tracer whose
  ``is_leaf_module`` says yes);
* a *leaf function*: ``wrap("name")`` at the top level of the module that calls it, or
  :func:`global_wrap` around the trace for code you cannot edit.

Leaf rule for the layers fusion folds. torch's tracer keeps a module whole only if its
class lives in ``torch.nn``: a user's ``class MyConv(nn.Conv2d)`` (or torchvision's
``Conv3DSimple``) is traced *through*, and the conv becomes an anonymous
``call_function conv3d`` that no pass can fold. Here a subclass of a torch conv, linear or
BatchNorm class whose ``forward`` (and, for convs, ``_conv_forward``) is still its parent's
stays a leaf, as does torchvision's ``FrozenBatchNorm2d`` (:func:`stock_forward_base`).
A subclass that overrides ``forward`` is traced through as before: it computes something
else, and is never treated as its parent.

:func:`symbolic_trace` turns torch's errors into a :class:`FxTraceError` that says where
tracing stopped (module path and source line) and which of these to try.
"""
from __future__ import annotations

import builtins
import contextlib
import inspect
import linecache
import os
import re
import sys
import traceback
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from fusionlib.display import format_table
from fusionlib.folding import frozen_batchnorm_class, stock_forward_base  # the leaf rule; re-exported
from fusionlib.modules import require_eval_mode, set_submodule  # re-exported: fusionlib.fx.tracing.* still works

#: Re-export: ``wrap("fn")`` at a module's top level makes ``fn`` a leaf for every trace.
wrap = fx.wrap

__all__ = [
    "FxTraceError",
    "symbolic_trace",
    "wrap",
    "global_wrap",
    "format_tabular",
    "print_tabular",
    "callable_name",
    "node_op_type",
    "modules_by_name",
    "propagate_shapes",
    "set_submodule",
    "require_eval_mode",
    "stock_forward_base",
    "frozen_batchnorm_class",
]


class FxTraceError(fx.proxy.TraceError):
    """``symbolic_trace`` failed; the message says where and what to try.

    Subclasses torch's ``TraceError``, so ``except torch.fx.proxy.TraceError`` still works.
    Attributes: ``model_name``, ``module_path`` (the module whose forward was being traced,
    or ``None``), ``location`` (``file:line in function: source``), ``cause`` (torch's error).
    """

    def __init__(self, message: str, *, model_name: str, module_path: str | None,
                 location: str | None, cause: BaseException) -> None:
        super().__init__(message)
        self.model_name = model_name
        self.module_path = module_path
        self.location = location
        self.cause = cause


# --------------------------------------------------------------------------- leaf rule

# --------------------------------------------------------------------------- tracing

def _module_type_matches(m: nn.Module, qualname: str, leaves: tuple[Any, ...]) -> bool:
    for leaf in leaves:
        if isinstance(leaf, str) and leaf == qualname:
            return True
        if isinstance(leaf, type) and isinstance(m, leaf):
            return True
    return False


def _locating_tracer_class(base: type[fx.Tracer]) -> type[fx.Tracer]:
    """A subclass of ``base`` that remembers which module call an error came out of."""

    class LocatingTracer(base):  # type: ignore[valid-type, misc]
        failed_module: tuple[str, str] | None = None
        extra_leaves: tuple[Any, ...] = ()

        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            if _module_type_matches(m, module_qualified_name, self.extra_leaves):
                return True
            if stock_forward_base(type(m)) is not None:  # the leaf rule (module docstring)
                return True
            return super().is_leaf_module(m, module_qualified_name)

        def call_module(self, m, forward, args, kwargs):  # noqa: ANN001 - torch's signature
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:
                if self.failed_module is None:  # the innermost module sees the error first
                    try:
                        path = self.path_of_module(m)
                    except Exception:  # a module that is not a submodule of the root
                        path = "?"
                    self.failed_module = (path or "<root>", type(m).__name__)
                raise

    LocatingTracer.__name__ = f"Locating{base.__name__}"
    return LocatingTracer


def _torch_dirs() -> tuple[str, ...]:
    here = os.path.dirname(os.path.abspath(__file__))
    return (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep, here + os.sep)


@dataclass
class _Failure:
    """Where tracing stopped: the innermost frame outside torch and fusionlib.fx (the user's line)."""

    location: str | None = None
    python_module: str | None = None  # the calling code's module, for global_wrap(module=...)


def _failure_site(exc: BaseException) -> _Failure:
    skip = _torch_dirs()
    frames = [(frame, lineno) for frame, lineno in traceback.walk_tb(exc.__traceback__)
              if not os.path.abspath(frame.f_code.co_filename).startswith(skip)]
    if not frames:
        return _Failure()
    frame, lineno = frames[-1]
    line = linecache.getline(frame.f_code.co_filename, lineno).strip()
    source = f" -> {line}" if line else ""
    location = f"{frame.f_code.co_filename}:{lineno} in {frame.f_code.co_name}(){source}"
    return _Failure(location, frame.f_globals.get("__name__"))


def _flag_arguments(model: Any) -> list[str]:
    """Arguments of ``model``'s forward with a plain default (bool, int, str, None): concrete_args candidates."""
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params
            if p.default is not inspect.Parameter.empty and isinstance(p.default, (bool, int, str, type(None)))]


def _hints(exc: BaseException, module_path: str | None, failure: _Failure, flags: Sequence[str] = ()) -> list[str]:
    """Ways out, most likely first, chosen from the error text and made concrete where we can."""
    text = str(exc)
    if module_path and module_path != "<root>":
        leaf = (f"make that module a leaf (traced as one call_module node): "
                f"symbolic_trace(model, leaf_modules=['{module_path}']) or leaf_modules=[ItsClass] "
                "(a Tracer whose is_leaf_module returns True for it)")
    else:
        leaf = ("make the offending submodule a leaf: symbolic_trace(model, leaf_modules=[TheBlockClass]) "
                "(a Tracer whose is_leaf_module returns True for it)")
    if flags:
        example = ", ".join(f"'{f}': ..." for f in flags)
        concrete = ("fix the non-tensor input that steers Python control flow to a constant: "
                    f"symbolic_trace(model, concrete_args={{{example}}})")
    else:
        concrete = ("concrete_args fixes a non-tensor input that steers control flow "
                    "(this forward has none with a plain default; a branch on tensor data needs a leaf module)")
    unsupported = re.search(r"'(\w+)' is not supported in symbolic tracing", text)
    fn = unsupported.group(1) if unsupported else "fn"
    where = f"'{failure.python_module}'" if failure.python_module else "TheCallingModuleOrClass"
    wrapped = (f"make the free function a leaf: torch.fx.wrap('{fn}') at the top of the module that calls it, "
               f"or `with fusionlib.fx.global_wrap({fn}, module={where}): symbolic_trace(model)` "
               "for code you cannot edit")
    if "control flow" in text:
        return [concrete, leaf, wrapped] if flags else [leaf, concrete, wrapped]
    if unsupported or any(s in text for s in ("len()", "interpreted as an integer", "iterable", "iterate")):
        return [wrapped, leaf, concrete]
    return [leaf, concrete, wrapped]


def symbolic_trace(model: nn.Module | Callable[..., Any],
                   concrete_args: dict[str, Any] | None = None, *,
                   leaf_modules: Iterable[type | str] = (),
                   autowrap_functions: Iterable[Callable[..., Any]] = (),
                   tracer_class: type[fx.Tracer] = fx.Tracer) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with leaf options and a clear :class:`FxTraceError`.

    ``leaf_modules``: module classes or qualified names recorded as single ``call_module``
    nodes (not traced through). ``autowrap_functions``: free functions recorded as single
    ``call_function`` nodes. ``tracer_class``: a custom ``torch.fx.Tracer`` subclass.
    """
    tracer_cls = _locating_tracer_class(tracer_class)
    tracer = tracer_cls(autowrap_functions=tuple(autowrap_functions))
    tracer.extra_leaves = tuple(leaf_modules)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else getattr(model, "__name__", "fn")
    try:
        graph = tracer.trace(model, concrete_args)
    except Exception as exc:
        module_path, module_type = tracer.failed_module or (None, None)
        failure = _failure_site(exc)
        location = failure.location
        where = [f"in module '{module_path}' ({module_type})" if module_path is not None
                 else f"in the forward of '{name}' itself"]
        if location is not None:
            where.append(f"at {location}")
        hints = _hints(exc, module_path, failure, _flag_arguments(model))
        message = (
            f"torch.fx could not trace '{name}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            f"  where: {' '.join(where)}\n"
            "  ways out:\n" + "\n".join(f"    {i}. {h}" for i, h in enumerate(hints, 1))
        )
        raise FxTraceError(message, model_name=name, module_path=module_path,
                           location=location, cause=exc) from exc
    return fx.GraphModule(tracer.root, graph, name)


# --------------------------------------------------------------------------- global_wrap

def _find_proxy(args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Proxy | None:
    found: list[fx.Proxy] = []
    fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return found[0] if found else None


def _leaf_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` that records one ``call_function`` node when it sees a proxy, else just runs."""

    def leaf(*args: Any, **kwargs: Any) -> Any:
        proxy = _find_proxy(args, kwargs)
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    leaf.__name__ = getattr(fn, "__name__", "leaf")
    leaf.__wrapped__ = fn  # type: ignore[attr-defined]
    return leaf


def _namespace_of(module: types.ModuleType | str | object | None, fn: Callable[..., Any] | str
                  ) -> types.ModuleType:
    """The module whose globals the calling code reads: ``module``, or where ``fn`` is defined."""
    if module is None:
        module = None if isinstance(fn, str) else getattr(fn, "__module__", None)
        if module in (None, "builtins"):
            name = fn if isinstance(fn, str) else getattr(fn, "__name__", fn)
            raise ValueError(f"global_wrap({name!r}): give module=, the module (or a class / function "
                             "defined in it) whose code calls it; a builtin or a name has no defining module")
    if isinstance(module, types.ModuleType):
        return module
    if isinstance(module, str):
        if module not in sys.modules:
            raise ValueError(f"global_wrap: module {module!r} is not imported")
        return sys.modules[module]
    owner = getattr(module, "__module__", None)  # a class or function: its defining module
    if owner is None or owner not in sys.modules:
        raise ValueError(f"global_wrap: cannot find the module of {module!r}")
    return sys.modules[owner]


_MISSING = object()


@contextlib.contextmanager
def global_wrap(fn: Callable[..., Any] | str, module: types.ModuleType | str | object | None = None
                ) -> Iterator[Callable[..., Any]]:
    """Make the free function ``fn`` a leaf while tracing code that lives in ``module``.

    Python looks a free name up in the *calling* module's globals, then in builtins, so we
    bind ``module.<name>`` to a wrapper that records ``call_function(fn)`` when an argument
    is a proxy (and simply calls ``fn`` otherwise). ``module`` is a module, its name, or any
    class / function defined in it (e.g. the third-party nn.Module class whose forward calls
    ``len``); it defaults to ``fn.__module__``. The binding is restored on exit, also when
    tracing raises. ``fn`` may be given by name (``"len"``: looked up in ``module``, then builtins).

        with global_wrap(len, module=ThirdPartyBlock):
            gm = symbolic_trace(model)
    """
    if isinstance(fn, str):
        name = fn
        namespace = _namespace_of(module, name)
        func = namespace.__dict__.get(name, _MISSING)
        if func is _MISSING:
            func = getattr(builtins, name, _MISSING)
        if func is _MISSING or not callable(func):
            raise ValueError(f"global_wrap: {name!r} is neither a function in {namespace.__name__} nor a builtin")
    else:
        func, name = fn, getattr(fn, "__name__", None)
        if not callable(func) or not name:
            raise TypeError(f"global_wrap expects a function or a name, got {fn!r}")
        namespace = _namespace_of(module, func)
    previous = namespace.__dict__.get(name, _MISSING)
    wrapper = _leaf_function(func)
    namespace.__dict__[name] = wrapper
    try:
        yield wrapper
    finally:
        if previous is _MISSING:
            namespace.__dict__.pop(name, None)
        else:
            namespace.__dict__[name] = previous


# --------------------------------------------------------------------------- readable graphs

#: Where torch's functions say they live -> how a reader knows them.
_MODULE_ALIASES = {"_operator": "operator", "torch.nn.functional": "F", "torch._C._nn": "F",
                   "torch._C._VariableFunctions": "torch", "builtins": ""}


def callable_name(fn: Any) -> str:
    """A short readable name: ``operator.add``, ``torch.flatten``, ``F.relu``, ``Tensor.add``, ``len``."""
    if isinstance(fn, str):
        return fn
    name = getattr(fn, "__name__", None) or repr(fn)
    owner = getattr(fn, "__objclass__", None)  # method descriptors such as Tensor.add
    if isinstance(owner, type) and issubclass(owner, torch._C.TensorBase):
        return f"Tensor.{name}"
    module = getattr(fn, "__module__", None)
    if module is None and any(v is fn for v in vars(torch).values()):
        module = "torch"
    module = _MODULE_ALIASES.get(module or "", module or "")
    return f"{module}.{name}" if module else name


def modules_by_name(root: nn.Module) -> dict[str, nn.Module]:
    """Every submodule under every name it has, aliases included.

    ``dict(root.named_modules())`` lists a module shared under two names
    (``self.conv2 = self.conv``) only once, so a graph node calling it by the other name
    would not be found; ``remove_duplicate=False`` keeps both names.
    """
    return dict(root.named_modules(remove_duplicate=False))


def node_op_type(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """What a node computes: the module class, function or method name, or the opcode."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_function":
        return callable_name(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return node.op


def _short(value: Any, width: int) -> str:
    text = str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def format_tabular(gm: fx.GraphModule | fx.Graph, max_width: int = 48) -> str:
    """The graph as a table: opcode, name, target, args, kwargs; one row per node.

    Cells longer than ``max_width`` characters are cut short with ``...`` (one line per
    node). Rendered by :func:`fusionlib.display.format_table` (``tabulate``, which torch's
    own ``Graph.print_tabular`` uses too).
    """
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    header = ["opcode", "name", "target", "args", "kwargs"]
    rows = []
    for n in graph.nodes:
        target = n.target if isinstance(n.target, str) else callable_name(n.target)
        rows.append([_short(c, max_width) for c in (n.op, n.name, target, n.args, n.kwargs if n.kwargs else "")])
    table = format_table(header, rows, colalign=["left"] * len(header))
    return "\n".join(line.rstrip() for line in table.splitlines())


def print_tabular(gm: fx.GraphModule | fx.Graph, max_width: int = 48) -> None:
    """Print :func:`format_tabular`."""
    print(format_tabular(gm, max_width))


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any] | torch.Tensor) -> None:
    """Record every node's output shape in ``node.meta["tensor_meta"]`` (``ShapeProp``, no autograd)."""
    from torch.fx.passes.shape_prop import ShapeProp

    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
