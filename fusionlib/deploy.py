r"""Deployment to ONNX Runtime and OpenVINO: export any course model, run it, read what the runtime did (notebook 16).

**Export.** :func:`export_onnx` calls ``torch.onnx.export(..., dynamo=False,
opset_version=17)``: the TorchScript-based exporter traces one forward and
translates each aten op to ONNX ops. That exporter is deprecated (since torch
2.9 ``dynamo=True``, built on ``torch.export``, is the default; it needs the
onnxscript package). It stays pinned here because ``torch.export`` cannot
capture our quantizers: they read tensor values in Python (``check_amax``
validates amax, the per-tensor step goes to torch's fake-quant op as a Python
float), which ``torch.export`` refuses as data-dependent, while the tracer
records those values as constants (the TracerWarnings :func:`_quiet_exporter`
silences). The dynamo exporter does translate torch's fake-quant ops to
Q/DQ pairs; what replaces this path is a quantized model it can capture, such
as torchao's PT2E flow (``prepare_pt2e`` / ``convert_pt2e``). In eval mode that exporter already folds
``Conv → BatchNormalization`` itself (its "eval peephole", the fold of
notebook 02); ``keep_batchnorm=True`` exports the BatchNorm nodes as they
are, so ONNX Runtime's own fold can be seen. The graph is checked with
``onnx.checker`` and an :class:`ExportReport` says which exporter and opset
were used and which ops the file holds.

**Quantized models as Q/DQ graphs.** Every enabled
:class:`~fusionlib.quant.TensorQuantizer` is switched to its export mode for
the export, so it calls torch's fake-quant kernels, which the exporter writes
as a ``QuantizeLinear → DequantizeLinear`` pair::

    q = saturate(round(x / s) + z)       QuantizeLinear     s = amax / qmax ("step_size"), z = 0
    x̂ = (q − z) · s                      DequantizeLinear

with int8 for signed quantizers (grid ``[−128, 127]``), uint8 for unsigned
ones (``[0, 255]``), one ``s`` per tensor, or one per channel along the
quantizer's axis (``axis=`` on both nodes) for weights. That is the graph
ONNX Runtime turns into integer kernels (``QLinearConv``, ``QLinearAdd``, ...)
and TensorRT consumes. ONNX's integer types are 8-bit (opset 17) and its
int8 grid is ``[−128, 127]``, so a quantizer with another bit width, a signed
narrow range (``[−127, 127]``) or ``fake_quant=False`` (it outputs integers)
is refused, by name, before anything is written
(:func:`fusionlib.quant.lowering.lowering_problem`, the rule int8 conversion asks too).

**Run.** :func:`ort_session` opens a file in an ONNX Runtime
``InferenceSession`` (CPU, ``threads`` intra-op threads, one inter-op
thread) and returns an :class:`OrtModule`: an ``nn.Module`` whose forward
takes and returns torch tensors, so :func:`fusionlib.verify.compare_outputs`
and :func:`fusionlib.bench.compare_models_latency` use it like any model.

**Store int8.** The exporter writes each quantized weight as a float
initializer followed by ``QuantizeLinear``: the file is as large as the fp32
one and ONNX Runtime quantizes the weights when it loads it.
:func:`compact_qdq` does that once, offline: each ``QuantizeLinear`` of a
constant becomes an int8 initializer (``round_half_even(W / s) + z``,
saturated: the operator's own definition), read by the ``DequantizeLinear``
that followed it, so the weights take one byte each on disk.

**Read.** :func:`optimized_graph` saves the graph ONNX Runtime actually runs
after its graph optimizations (constant folding, Conv+BatchNorm fusion,
Conv+activation fusion, Q/DQ → QLinear* kernels, NCHWc / NHWC layout
transforms) and :func:`op_counts` / :func:`op_count_table` count its nodes by
op type next to the exported ones.

**Run with OpenVINO.** :func:`ov_compile` reads the same file with
OpenVINO's own ONNX frontend and compiles it for its CPU plugin (built on
oneDNN); the :class:`OvModule` it returns is an ``nn.Module`` like
:class:`OrtModule`. It asks for ``threads`` inference threads, one stream
(one request at a time), the latency hint, no CPU pinning (the caller's
threads stay free to move), and an inference precision (``INFERENCE_PRECISION_HINT``):
``"f32"`` by default, because on a CPU with AVX-512 BF16 or AMX the plugin's
own default is bf16, which runs an fp32 model in bfloat16 (8 significant
bits) without a word. ``precision=None`` keeps the plugin's default.
:attr:`OvModule.precision` is the precision the compiled model reports, which
is what it runs: a hint the CPU cannot honour (bf16 without a bf16 unit)
falls back to f32, and :func:`ov_cpu_plugin` says what the plugin's default
is on this CPU. On a Q/DQ file, OpenVINO's low-precision transformations run
the quantized convolutions on integer kernels (:meth:`OvModule.runtime_precisions`
counts the executed layers by the precision they run in), whatever the
precision hint says about the float parts.

onnx and onnxruntime are an optional extra (``pip install -e '.[deploy]'``):
without them, :func:`available` is False and every function that needs them
raises :class:`DeployUnavailable` with that one-line hint. openvino, in the
same extra, has its own check (:func:`openvino_available`): without it only
the OpenVINO functions raise, and notebook cells started with ``%%openvino``
are skipped while the ``%%onnx`` ones still run.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from fusionlib.arguments import check_positive_int
from fusionlib.display import listing
from fusionlib.modules import eval_mode
from fusionlib.quant.lowering import lowering_problem
from fusionlib.quant.ptq import weight_quantizer_ids
from fusionlib.quant.tensor_quantizer import TensorQuantizer

__all__ = [
    "OPSET",
    "EXPORTER",
    "INSTALL_HINT",
    "DeployUnavailable",
    "ONNXExportError",
    "available",
    "versions",
    "status_line",
    "register_notebook_magic",
    "export_onnx",
    "ExportReport",
    "exportable_quantizers",
    "OrtModule",
    "ort_session",
    "optimized_graph",
    "op_counts",
    "op_count_table",
    "node_rows",
    "constant_values",
    "compact_qdq",
    "file_size_mb",
    "top1_agreement",
    "OV_INSTALL_HINT",
    "OV_PRECISIONS",
    "openvino_available",
    "openvino_status_line",
    "ov_cpu_plugin",
    "OvModule",
    "ov_compile",
]

#: The ONNX opset every export uses (QuantizeLinear / DequantizeLinear per channel need >= 13).
OPSET = 17
#: The exporter :func:`export_onnx` calls.
EXPORTER = "torch.onnx.export, TorchScript-based (dynamo=False)"
INSTALL_HINT = "pip install -e '.[deploy]'  (or: pip install onnx onnxruntime)"
OV_INSTALL_HINT = "pip install -e '.[deploy]'  (or: pip install openvino)"
#: The inference precisions :func:`ov_compile` can ask OpenVINO's CPU plugin for (``None``: the plugin's default).
OV_PRECISIONS = ("f32", "bf16", "f16")


class DeployUnavailable(RuntimeError):
    """onnx, onnxruntime or openvino is not installed; the message is the one-line install hint."""


class ONNXExportError(RuntimeError):
    """The exporter could not translate the model; the message names the op and where it is called."""


def _absent(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # ValueError: blocked with sys.modules[name] = None
        return True


def _missing() -> list[str]:
    return [name for name in ("onnx", "onnxruntime") if _absent(name)]


def available() -> bool:
    """True when onnx and onnxruntime are both installed (the ``deploy`` extra)."""
    return not _missing()


def _require() -> tuple[Any, Any]:
    missing = _missing()
    if missing:
        raise DeployUnavailable(f"fusionlib.deploy needs {' and '.join(missing)}: {INSTALL_HINT}") from None
    import onnx
    import onnxruntime

    return onnx, onnxruntime


def versions() -> dict[str, str]:
    """Versions of torch, onnx and onnxruntime (what an export and a measurement depend on)."""
    onnx, ort = _require()
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}


def status_line() -> str:
    """One line for a notebook: the versions in use, or what is missing and the install hint."""
    if not available():
        return (f"{' and '.join(_missing())} not installed, so the ONNX cells are skipped; install the deploy extra: "
                f"{INSTALL_HINT}")
    v = versions()
    return f"onnx {v['onnx']}, onnxruntime {v['onnxruntime']}, torch {v['torch']}: the ONNX cells run"


def openvino_available() -> bool:
    """True when openvino is installed (it is in the ``deploy`` extra, but checked on its own)."""
    return not _absent("openvino")


def _require_openvino() -> Any:
    if not openvino_available():
        raise DeployUnavailable(f"fusionlib.deploy's OpenVINO path needs openvino: {OV_INSTALL_HINT}") from None
    import openvino

    return openvino


def openvino_status_line() -> str:
    """One line for a notebook: OpenVINO's version, or what is missing for the ``%%openvino`` cells and how to get it.

    Those cells run OpenVINO on the files the ONNX cells export and compare it
    with ONNX Runtime, so they need onnx and onnxruntime too.
    """
    missing = _missing() + ([] if openvino_available() else ["openvino"])
    if missing:
        hint = (OV_INSTALL_HINT if missing == ["openvino"]
                else INSTALL_HINT.replace("onnxruntime", "onnxruntime openvino"))
        return (f"{' and '.join(missing)} not installed, so the OpenVINO cells are skipped; install the deploy extra: "
                f"{hint}")
    return f"openvino {_require_openvino().get_version().split('-')[0]}: the OpenVINO cells run"


def register_notebook_magic() -> bool:
    """Register the cell magics ``%%onnx`` and ``%%openvino``: each cell runs when what it needs is installed.

    ``%%onnx`` needs onnx and onnxruntime; ``%%openvino`` needs openvino as
    well (its cells read the exported files and compare with ONNX Runtime).
    Otherwise the cell prints that it is skipped and the install hint.
    The cell body runs in the notebook's namespace; its errors surface as in
    any cell, with the cell's lines in the traceback. Outside IPython it does nothing and
    returns False.
    """
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with Jupyter
        return False
    shell = get_ipython()
    if shell is None:
        return False

    import itertools
    import linecache

    counter = itertools.count(1)

    def run(kind: str, cell: str) -> None:
        filename = f"<{kind} cell {next(counter)}>"  # registered, so a traceback shows the cell's lines
        linecache.cache[filename] = (len(cell), None, cell.splitlines(keepends=True), filename)
        exec(compile(cell, filename, "exec"), shell.user_ns)

    def onnx(line: str, cell: str) -> None:
        if not available():
            print(f"(cell skipped) {status_line()}")
            return
        run("onnx", cell)

    def openvino(line: str, cell: str) -> None:
        if not (available() and openvino_available()):
            print(f"(cell skipped) {openvino_status_line()}")
            return
        run("openvino", cell)

    shell.register_magic_function(onnx, magic_kind="cell", magic_name="onnx")
    shell.register_magic_function(openvino, magic_kind="cell", magic_name="openvino")
    return True


# ---------------------------------------------------------------------- quantizers
def exportable_quantizers(model: nn.Module) -> list[str]:
    """Names of the quantizers that will become Q/DQ pairs; raises, naming them, for any that cannot.

    Whether one can is :func:`fusionlib.quant.lowering.lowering_problem`'s
    ``"qdq"`` rule, the one ``convert_int8`` asks too: disabled or not
    quantizing is the identity (nothing exported); otherwise an amax, not
    calibrating, fake quant, 8 bits, not a signed narrow range, per tensor or
    along one axis. Every problem is listed, grouped, before anything is written.
    """
    weights = weight_quantizer_ids(model)
    active: list[str] = []
    problems: dict[str, list[str]] = {}
    for name, q in model.named_modules():
        if not isinstance(q, TensorQuantizer):
            continue
        label = name or "<model>"
        problem = lowering_problem(q, "qdq", weight=id(q) in weights)
        if problem is not None:
            problems.setdefault(problem, []).append(label)
        elif not q.disabled and q.quant_enabled:
            active.append(label)
    if problems:
        raise ValueError("cannot export as Q/DQ: " + "; ".join(f"{len(names)} quantizer(s) with {problem}: "
                                                              f"{listing(names)}" for problem, names in problems.items()))
    return active


@contextlib.contextmanager
def _export_mode(model: nn.Module, activations: str = "int8") -> Iterator[None]:
    """Every TensorQuantizer of ``model`` in export mode (instance attributes), restored afterwards.

    ``activations="uint8"``: signed per-tensor quantizers of activations (not weights) export shifted onto uint8.
    """
    if activations not in ("int8", "uint8"):
        raise ValueError(f"activations must be 'int8' or 'uint8', got {activations!r}")
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    weights = weight_quantizer_ids(model)
    names = ("export_mode", "export_uint8_shift")
    saved = [{k: m.__dict__[k] for k in names if k in m.__dict__} for m in quantizers]
    try:
        for m in quantizers:
            m.export_mode = True
            m.export_uint8_shift = activations == "uint8" and id(m) not in weights
        yield
    finally:
        for m, values in zip(quantizers, saved):
            for k in names:
                m.__dict__.pop(k, None)
            m.__dict__.update(values)


# ---------------------------------------------------------------------- export
@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: file, exporter, opset, node counts by op type, Q/DQ pairs, sizes, seconds."""

    path: Path
    opset: int
    exporter: str
    versions: dict[str, str]
    op_counts: dict[str, int]
    quantizers: list[str] = field(default_factory=list)
    batchnorm_kept: bool = False
    size_mb: float = 0.0
    seconds: float = 0.0

    @property
    def qdq_pairs(self) -> int:
        return min(self.op_counts.get("QuantizeLinear", 0), self.op_counts.get("DequantizeLinear", 0))

    def __str__(self) -> str:
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines = [f"{self.path.name}: ONNX opset {self.opset}, {self.exporter}; torch {self.versions.get('torch')}, "
                 f"onnx {self.versions.get('onnx')}; checked with onnx.checker; {self.size_mb:.2f} MB, "
                 f"exported in {self.seconds:.1f} s",
                 f"  nodes: {sum(self.op_counts.values())} ({ops})"]
        if self.quantizers:
            lines.append(f"  {len(self.quantizers)} quantizers exported as QuantizeLinear/DequantizeLinear "
                         f"({self.qdq_pairs} pairs in the graph)")
        if self.batchnorm_kept:
            lines.append("  BatchNorm exported as BatchNormalization nodes (keep_batchnorm=True)")
        return "\n".join(lines)


def _unsupported_op(err: BaseException) -> str | None:
    match = re.search(r"operator '([\w:.]+)'", str(err))
    return match.group(1) if match else None


def _where_op_runs(model: nn.Module, args: tuple, op_name: str) -> list[str]:
    """The modules (dotted names and classes) inside which aten op ``op_name`` runs in one forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stack: list[str] = []
    found: list[str] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if (name == op_name or name.removeprefix("aten::") == op_name.removeprefix("aten::")) and stack:
                where = stack[-1]
                if where not in found:
                    found.append(where)
            return func(*args, **(kwargs or {}))

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:  # a hook returning a value replaces the output
        if stack:
            stack.pop()

    names = {m: n for n, m in model.named_modules()}
    handles = []
    for m, n in names.items():
        label = f"{n or '<model>'} ({type(m).__name__})"
        handles.append(m.register_forward_pre_hook(lambda mod, inp, label=label: stack.append(label)))
        handles.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad(), Spy():
            model(*args)
    except Exception:
        pass
    finally:
        for h in handles:
            h.remove()
    return found


def _check_export_arguments(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], opset: int,
                            input_names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """The positional example inputs; refuses a model in training mode (naming its modules), a bad opset or inputs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx takes an nn.Module, got {type(model).__name__}")
    # bare containers (torch.fx makes nn.Module() ones for dotted names) compute nothing themselves
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    training = [n or "<model>" for n, m in model.named_modules()
                if m.training and not isinstance(m, TensorQuantizer)  # a quantizer computes the same in both modes
                and not (n and (type(m) is nn.Module or isinstance(m, containers)))]
    if training:
        raise ValueError(f"export_onnx exports inference graphs: call model.eval() first "
                         f"({len(training)} module(s) in training mode: {listing(training)})")
    if not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be an int >= 13 (per-channel QuantizeLinear), got {opset!r}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("example_inputs must be a tensor or a sequence of tensors")
    if len(input_names) != len(args):
        raise ValueError(f"{len(args)} example input(s) but input_names has {len(input_names)}: {list(input_names)}")
    return args


def _dynamic_axes(args: tuple[torch.Tensor, ...], input_names: Sequence[str], output_names: Sequence[str],
                  dynamic_batch: bool, dynamic_image_size: bool) -> dict[str, dict[int, str]]:
    """The exporter's ``dynamic_axes``: dimension 0 of every input and output, and H, W of 4-d inputs."""
    dynamic_axes: dict[str, dict[int, str]] = {}
    for name, x in [*zip(input_names, args), *((n, None) for n in output_names)]:
        axes = {0: "batch"} if dynamic_batch else {}
        if dynamic_image_size and x is not None and x.dim() == 4:
            axes.update({2: "height", 3: "width"})
        if axes:
            dynamic_axes[name] = axes
    return dynamic_axes


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The legacy exporter's warnings that say nothing about the model."""
    with warnings.catch_warnings():
        # the tracer warns about every Python-level check it cannot record (shape asserts in our quantizers)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's own logging helper
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        # keep_batchnorm exports with TrainingMode.PRESERVE on an eval model: nothing learnable is folded
        warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
        yield


def _run_exporter(model: nn.Module, args: tuple[torch.Tensor, ...], path: str, opset: int, mode: Any,
                  input_names: Sequence[str], output_names: Sequence[str],
                  dynamic_axes: dict[str, dict[int, str]]) -> None:
    """``torch.onnx.export`` (the TorchScript exporter); its errors name the op and the modules where it runs."""
    try:
        torch.onnx.export(model, args, path, dynamo=False, opset_version=opset, training=mode,
                          input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes or None, do_constant_folding=True)
    except Exception as err:
        op = _unsupported_op(err)
        if op is None:
            raise ONNXExportError(f"torch.onnx.export (opset {opset}) failed: "
                                  f"{str(err).strip().splitlines()[0]}") from err
        where = _where_op_runs(model, args, op)
        at = f" in {listing(where)}" if where else ""
        raise ONNXExportError(f"the ONNX exporter cannot translate the op {op!r}{at} (opset {opset}); "
                              "replace that computation, or register a custom symbolic "
                              "(torch.onnx.register_custom_op_symbolic)") from None


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike,
    *,
    opset: int = OPSET,
    dynamic_batch: bool = True,
    dynamic_image_size: bool = False,
    keep_batchnorm: bool = False,
    activations: str = "int8",
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("output",),
) -> ExportReport:
    """Export ``model`` (in eval mode) to ``path`` as ONNX; fake quantizers become QuantizeLinear / DequantizeLinear.

    ``example_inputs``: one tensor or a sequence of positional inputs (their
    shapes are traced; ``dynamic_batch`` leaves dimension 0 free,
    ``dynamic_image_size`` the height and width of 4-d inputs too: one file
    for every size, at the price of shape-specific optimizations).
    ``keep_batchnorm``: export BatchNorm as BatchNormalization nodes instead
    of letting the exporter fold them into the convs. ``activations``: how
    signed activation quantizers are stored, ``"int8"`` (zero point 0) or
    ``"uint8"`` (the same values shifted: zero point 128, the type x86 int8
    kernels take; weights stay int8). The caller's model is
    not changed (quantizers are in export mode only during the call); the file
    is written completely or not at all, then checked with ``onnx.checker``.
    Errors name what is wrong: a module in training mode, quantizers that
    cannot be exported, or the op the exporter cannot translate and the
    modules where it runs.
    """
    onnx, _ = _require()
    args = _check_export_arguments(model, example_inputs, opset, input_names)
    quantizers = exportable_quantizers(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_axes = _dynamic_axes(args, input_names, output_names, dynamic_batch, dynamic_image_size)
    mode = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent, prefix=f".{path.stem}-")
    os.close(fd)
    start = time.perf_counter()
    try:
        # eval_mode gives every submodule its own train flag back: the exporter's model.train(flag) would reset
        # them all to the root's
        with eval_mode(model), _export_mode(model, activations), torch.no_grad(), _quiet_exporter():
            _run_exporter(model, args, tmp, opset, mode, input_names, output_names, dynamic_axes)
        seconds = time.perf_counter() - start
        onnx.checker.check_model(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    counts = op_counts(path)
    if quantizers and counts.get("BatchNormalization") and not keep_batchnorm:
        batchnorms = [n for n, m in model.named_modules() if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)]
        warnings.warn(f"{counts['BatchNormalization']} BatchNorm layer(s) ({listing(batchnorms, 3)}) stay in the Q/DQ "
                      "graph: neither the exporter nor ONNX Runtime folds a BatchNorm into a conv whose weight is "
                      "quantized, so those convs run in float. Fold first (fusionlib.fx.fuse_conv_bn), then quantize.",
                      stacklevel=2)
    return ExportReport(path=path, opset=opset, exporter=EXPORTER, versions=versions(), op_counts=counts,
                        quantizers=quantizers, batchnorm_kept=keep_batchnorm, size_mb=file_size_mb(path),
                        seconds=seconds)


# ---------------------------------------------------------------------- run
class OrtModule(nn.Module):
    """An ONNX Runtime session as an ``nn.Module``: ``forward`` takes torch tensors and returns torch tensors.

    One output comes back as a tensor, several as a tuple. ``copy.deepcopy``
    opens a new session on the same file with the same options.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1, optimization: str = "all",
                 optimized_model_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        _, ort = _require()
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise ValueError(f"optimization must be one of {sorted(levels)}, got {optimization!r}")
        check_positive_int("threads", threads)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file at {self.path}")
        self.threads, self.optimization = threads, optimization
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = levels[optimization]
        options.log_severity_level = 3  # errors only (saving an NCHWc-optimized graph warns that it is CPU-specific)
        if optimized_model_path is not None:
            options.optimized_model_filepath = str(optimized_model_path)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.path.name} takes {len(self.input_names)} input(s) {self.input_names}, "
                             f"got {len(inputs)}")
        feed = {name: x.detach().cpu().contiguous().numpy() for name, x in zip(self.input_names, inputs)}
        outputs = [torch.from_numpy(o) for o in self.session.run(self.output_names, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def __deepcopy__(self, memo: dict) -> "OrtModule":
        return OrtModule(self.path, self.threads, self.optimization)

    def extra_repr(self) -> str:
        return f"{self.path.name}, threads={self.threads}, optimization={self.optimization!r}"


def ort_session(path: str | os.PathLike, threads: int = 1, optimization: str = "all") -> OrtModule:
    """An :class:`OrtModule` on ``path``: CPU, ``threads`` intra-op threads, graph optimizations ``optimization``.

    ``optimization``: "disable", "basic" (constant folding, redundant nodes),
    "extended" (fusions: Conv+BN, Conv+activation, Q/DQ -> QLinear ops, ...)
    or "all" (extended plus layout transforms such as NCHWc), the default.
    """
    return OrtModule(path, threads=threads, optimization=optimization)


# ---------------------------------------------------------------------- run with OpenVINO
def _precision_name(value: Any) -> str:
    """OpenVINO's element type as its short name ("f32", "bf16", "f16"); a string passes through."""
    return value.to_string() if hasattr(value, "to_string") else str(value)


def ov_cpu_plugin() -> dict[str, Any]:
    """What OpenVINO's CPU plugin reports about this CPU, before any model is compiled.

    ``device`` (the CPU's name), ``capabilities`` (``OPTIMIZATION_CAPABILITIES``:
    FP32, INT8, and BF16 / FP16 where the CPU has fast kernels for them),
    ``default_precision`` (``INFERENCE_PRECISION_HINT`` as the plugin sets it
    by itself: ``"bf16"`` on a CPU with AVX-512 BF16 or AMX, so an fp32 model
    runs in bfloat16 there unless told otherwise; ``"f32"`` elsewhere) and
    ``openvino`` (the version).
    """
    ov = _require_openvino()
    core = ov.Core()
    return {"device": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
            "capabilities": [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")],
            "default_precision": _precision_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
            "openvino": ov.get_version().split("-")[0]}


class OvModule(nn.Module):
    """An OpenVINO compiled model (CPU plugin) as an ``nn.Module``: ``forward`` takes and returns torch tensors.

    One output comes back as a tensor, several as a tuple. ``precision`` is
    what the compiled model reports it runs in (``INFERENCE_PRECISION_HINT``
    read back after compiling), ``requested_precision`` what was asked
    (``None``: the plugin's default). ``copy.deepcopy`` compiles the file anew
    with the same options. ``forward`` refuses an input whose shape or dtype
    the compiled model does not take: OpenVINO's own ``infer`` returns the
    previous request's output for one, without an error.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1, precision: str | None = "f32") -> None:
        super().__init__()
        ov = _require_openvino()
        check_positive_int("threads", threads)
        if precision is not None and precision not in OV_PRECISIONS:
            raise ValueError(f"precision must be one of {list(OV_PRECISIONS)} or None (the plugin's default), "
                             f"got {precision!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file at {self.path}")
        self.threads, self.requested_precision = threads, precision
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                                  "ENABLE_CPU_PINNING": False}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = _precision_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        # (min, max) per dimension, max -1 when unbounded: OpenVINO does not refuse an input of another shape itself
        self._input_bounds = [[(d.get_min_length(), d.get_max_length()) for d in port.get_partial_shape()]
                              for port in self.compiled.inputs]
        self._input_dtypes = [port.get_element_type().to_dtype() for port in self.compiled.inputs]

    def _check_input(self, i: int, x: Any) -> None:
        bounds, dtype = self._input_bounds[i], self._input_dtypes[i]
        fits = len(x.shape) == len(bounds) and all(lo <= n and (hi < 0 or n <= hi)
                                                   for n, (lo, hi) in zip(x.shape, bounds))
        if not fits:
            expected = ", ".join(str(lo) if lo == hi else "?" if hi < 0 and lo == 0
                                 else f"{lo}..{hi if hi >= 0 else ''}" for lo, hi in bounds)
            raise ValueError(f"{self.path.name}: input {self.input_names[i]!r} takes shape [{expected}], "
                             f"got {list(x.shape)} (export with dynamic axes for other sizes)")
        if x.dtype != dtype:
            raise TypeError(f"{self.path.name}: input {self.input_names[i]!r} takes {dtype}, got {x.dtype}")

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.path.name} takes {len(self.input_names)} input(s) {self.input_names}, "
                             f"got {len(inputs)}")
        feed = {i: x.detach().cpu().contiguous().numpy() for i, x in enumerate(inputs)}
        for i, x in feed.items():
            self._check_input(i, x)
        results = self.request.infer(feed)
        outputs = [torch.from_numpy(results[port].copy()) for port in self.compiled.outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def runtime_precisions(self) -> dict[str, dict[str, int]]:
        """Executed layers by type and by the precision each runs in, e.g. ``{"Convolution": {"u8": 20}}``.

        Read from the compiled model's runtime graph (``layerType`` and
        ``runtimePrecision`` of each node; inputs, outputs and constants left
        out). A fused activation is part of its convolution's layer.
        """
        counts: dict[str, collections.Counter] = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            layer = info["layerType"].astype(str)
            if layer in ("Input", "Output", "Const"):
                continue
            counts.setdefault(layer, collections.Counter())[info["runtimePrecision"].astype(str)] += 1
        return {layer: dict(c) for layer, c in counts.items()}

    def __deepcopy__(self, memo: dict) -> "OvModule":
        return OvModule(self.path, self.threads, self.requested_precision)

    def extra_repr(self) -> str:
        asked = "the plugin's default" if self.requested_precision is None else repr(self.requested_precision)
        return f"{self.path.name}, threads={self.threads}, precision {asked}, runs in {self.precision}"


def ov_compile(path: str | os.PathLike, threads: int = 1, precision: str | None = "f32") -> OvModule:
    """An :class:`OvModule`: ``path`` compiled by OpenVINO's CPU plugin for one request at a time, latency first.

    ``threads`` inference threads, one stream, the latency hint, no CPU
    pinning, and ``precision`` as the inference precision hint: ``"f32"``
    (the default: the arithmetic the file states), ``"bf16"`` or ``"f16"``
    (taken only where the CPU has kernels for it, otherwise the model runs
    in f32; read :attr:`OvModule.precision`), or ``None`` for the plugin's
    own default (bf16 on a CPU with AVX-512 BF16 or AMX, f32 elsewhere:
    :func:`ov_cpu_plugin`).
    """
    return OvModule(path, threads=threads, precision=precision)


# ---------------------------------------------------------------------- read
def optimized_graph(path: str | os.PathLike, out_path: str | os.PathLike | None = None, threads: int = 1,
                    optimization: str = "all") -> Path:
    """Save the graph ONNX Runtime runs for ``path`` after its optimizations (default: ``<stem>.ort-<level>.onnx``)."""
    path = Path(path)
    out = Path(out_path) if out_path is not None else path.with_name(f"{path.stem}.ort-{optimization}.onnx")
    OrtModule(path, threads=threads, optimization=optimization, optimized_model_path=out)
    return out


def op_counts(model_or_path: Any) -> dict[str, int]:
    """Nodes by op type (domain-qualified for non-ONNX domains, e.g. ``com.microsoft.FusedConv``)."""
    onnx, _ = _require()
    graph = onnx.load(str(model_or_path), load_external_data=False).graph if isinstance(
        model_or_path, (str, os.PathLike)) else model_or_path.graph
    counts = collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in graph.node)
    return dict(counts)


def op_count_table(columns: dict[str, dict[str, int]]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) for :func:`fusionlib.display.format_table`: one row per op type, one column per graph."""
    ops = sorted({op for counts in columns.values() for op in counts},
                 key=lambda op: (-max(c.get(op, 0) for c in columns.values()), op))
    rows = [[op] + [counts.get(op, 0) for counts in columns.values()] for op in ops]
    rows.append(["total"] + [sum(counts.values()) for counts in columns.values()])
    return ["op type", *columns], rows


def file_size_mb(path: str | os.PathLike) -> float:
    return Path(path).stat().st_size / 1e6


def top1_agreement(reference: torch.Tensor, other: torch.Tensor, tolerance: float = 0.0) -> float:
    """Share of rows on which two logit tensors ``[N, classes]`` pick the same class: ``mean(argmax a == argmax b)``.

    The int8 gate of notebooks 16 and 18 (an int8 runtime against the fake-quant
    model it came from). Ties in a row go to the first largest logit, as
    ``argmax`` breaks them. ``tolerance > 0``: a row agrees when ``other``'s
    top-1 class scores within ``tolerance`` of the best score in ``reference``,
    ``reference[i, argmax other_i] >= max reference_i - tolerance``. With one step
    of a quantized output as the tolerance, classes that close are a tie at the
    output's own resolution, which one rounding difference inside an integer
    kernel can break either way (:func:`fusionlib.pipeline.output_step`).
    """
    if not (isinstance(reference, torch.Tensor) and isinstance(other, torch.Tensor)):
        raise TypeError(f"top1_agreement takes two tensors, got {type(reference).__name__} and {type(other).__name__}")
    if reference.dim() != 2 or reference.shape != other.shape or reference.shape[0] == 0:
        raise ValueError(f"top1_agreement takes two logit tensors of the same shape [N, classes] with N > 0, got "
                         f"{tuple(reference.shape)} and {tuple(other.shape)}")
    if not (isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) and math.isfinite(tolerance)
            and tolerance >= 0):
        raise ValueError(f"top1_agreement's tolerance must be a finite number >= 0, got {tolerance!r}")
    if tolerance == 0:
        return float((reference.argmax(1) == other.argmax(1)).float().mean())
    picked = reference.gather(1, other.argmax(1, keepdim=True)).squeeze(1)
    return float((picked >= reference.max(1).values - tolerance).float().mean())


def node_rows(model_or_path: Any, limit: int | None = 12) -> list[list[str]]:
    """The first ``limit`` nodes as rows ``[op type, name, activation]`` (a fused activation is an attribute)."""
    onnx, _ = _require()
    graph = onnx.load(str(model_or_path)).graph if isinstance(model_or_path, (str, os.PathLike)) else model_or_path.graph
    rows = []
    for node in list(graph.node)[:limit]:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        activation = next((a.s.decode() for a in node.attribute if a.name == "activation"), "")
        rows.append([op, node.name, activation])
    return rows


def constant_values(model_or_path: Any) -> dict[str, Any]:
    """Every constant tensor of a graph as a numpy array, by name: its initializers, its ``Constant`` nodes and the
    ``Identity`` nodes of either (the exporter writes two equal constants, e.g. the scales of two weight
    quantizers with the same amax, as one initializer and an ``Identity``)."""
    onnx, _ = _require()
    from onnx import numpy_helper

    graph = onnx.load(str(model_or_path)).graph if isinstance(model_or_path, (str, os.PathLike)) else model_or_path.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:   # nodes are in graph order: chains resolve
            values[node.output[0]] = values[node.input[0]]
    return values


def compact_qdq(path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Store every quantized constant as integers: ``QuantizeLinear(W)`` of an initializer becomes an int8 initializer.

    ``Min`` / ``Max`` of constants in front of it (the clamp of a weight of fewer than 8 bits) are folded first.

    ``q = saturate(round_half_even(W / s) + z)`` per tensor or along the
    node's axis, exactly as the operator defines it, so the graph computes the
    same; the float initializer is dropped when nothing else reads it. Writes
    ``out_path`` (default ``<stem>.int8.onnx``), checks it with ``onnx.checker``
    and returns its path.
    """
    onnx, _ = _require()
    import numpy as np
    from onnx import numpy_helper

    path = Path(path)
    out = Path(out_path) if out_path is not None else path.with_name(f"{path.stem}.int8.onnx")
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    values = constant_values(model)
    removed, new_initializers = [], []
    for node in list(graph.node):   # a weight clamped to a narrower grid (lowering's (*)): Min / Max of constants, folded
        if node.op_type in ("Min", "Max") and all(i in values for i in node.input) and node.input[0] in initializers:
            folded = values[node.input[0]]
            for other in node.input[1:]:   # broadcasting, as the operator does
                folded = (np.minimum if node.op_type == "Min" else np.maximum)(folded, values[other])
            graph.node.remove(node)
            graph.initializer.append(numpy_helper.from_array(folded.astype(values[node.input[0]].dtype), node.output[0]))
            initializers.add(node.output[0])
            values[node.output[0]] = folded
    for node in graph.node:
        if (node.op_type != "QuantizeLinear" or node.input[0] not in initializers or len(node.input) < 3
                or node.input[1] not in values or node.input[2] not in values):
            continue
        w, scale, zero_point = (values[name] for name in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.size > 1:  # per channel: broadcast along axis
            shape = [1] * w.ndim
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        info = np.iinfo(zero_point.dtype)
        q = np.clip(np.rint(w.astype(np.float32) / scale.astype(np.float32)) + zero_point.astype(np.int32),
                    info.min, info.max).astype(zero_point.dtype)
        new_initializers.append(numpy_helper.from_array(q, name=node.output[0]))
        removed.append(node)
    for node in removed:
        graph.node.remove(node)
    graph.initializer.extend(new_initializers)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(t)
    for n in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in read]:
        graph.node.remove(n)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out
