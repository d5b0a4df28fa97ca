"""Conv2d anatomy: output sizes, weight shapes, parameter and MAC counts.

The formulas notebook 01 derives, for a convolution with ``C_in`` input and
``C_out`` output channels, a ``k_h x k_w`` kernel, ``g`` groups, stride ``s``,
padding ``p`` and dilation ``d``:

* output size (per spatial axis): ``floor((n + 2p - d(k - 1) - 1) / s) + 1``
* weight shape: ``[C_out, C_in / g, k_h, k_w]``, bias shape: ``[C_out]``
* parameters: ``C_out * (C_in / g) * k_h * k_w (+ C_out)``
* multiply-accumulates per example: ``H_out * W_out * C_out * (C_in / g) * k_h * k_w``
  (FLOPs are conventionally ``2 * MACs``; bias additions are not counted)
* depthwise-separable (depthwise ``k x k`` then pointwise ``1 x 1``) over
  standard cost: ``1 / C_out + 1 / k^2``

:func:`layer_table` measures a whole model with forward hooks: one row per
Conv / Linear / BatchNorm layer with its shapes, kind, parameters and MACs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from fusionlib.arguments import check_positive_int
from fusionlib.display import format_table
from fusionlib.modules import eval_mode

#: Layers :func:`layer_table` measures. Other modules (ReLU, pooling, ...) are
#: cheap or parameter-free and are not listed.
COUNTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)

#: Order in which kinds are listed by :meth:`LayerTable.by_kind`.
KINDS = ("standard", "pointwise", "depthwise", "grouped", "linear", "batchnorm")

#: Kinds whose MACs papers quote and torch.utils.flop_counter counts (as FLOPs = 2 * MACs).
CONV_LINEAR_KINDS = ("standard", "pointwise", "depthwise", "grouped", "linear")


# ---------------------------------------------------------------- formulas


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 1) -> (3, 1)``; anything else is a ValueError."""
    if isinstance(value, int):
        return (value, value)
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        check_positive_int(name, value)


def check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    """Raise a ValueError unless ``groups`` divides both channel counts.

    Each of the ``g`` groups maps ``C_in / g`` input channels to ``C_out / g``
    output channels, so both must be whole numbers (nn.Conv2d checks the same).
    """
    _check_positive(in_channels=in_channels, out_channels=out_channels, groups=groups)
    bad = [f"{name}={value}" for name, value in (("in_channels", in_channels), ("out_channels", out_channels))
           if value % groups]
    if bad:
        raise ValueError(
            f"groups={groups} must divide in_channels and out_channels, but it does not divide "
            f"{' and '.join(bad)}; pick groups among the common divisors of {in_channels} and {out_channels}"
        )


def same_padding(kernel_size: int, dilation: int = 1) -> tuple[int, int]:
    """Padding (before, after) that keeps the size at stride 1: total ``d(k - 1)``.

    An odd total cannot be split evenly; like nn.Conv2d(padding='same') the
    extra element goes after (right / bottom).
    """
    _check_positive(kernel_size=kernel_size, dilation=dilation)
    total = dilation * (kernel_size - 1)
    return (total // 2, total - total // 2)


def conv_output_size(
    in_size: int,
    kernel_size: int,
    stride: int = 1,
    padding: int | str = 0,
    dilation: int = 1,
) -> int:
    """Output length along one spatial axis: ``floor((n + 2p - d(k - 1) - 1) / s) + 1``.

    ``padding`` is an int (that many zeros on each side), ``'valid'`` (= 0) or
    ``'same'`` (output length = input length; only defined at stride 1, as in
    nn.Conv2d). ``d(k - 1) + 1`` is the extent of the dilated kernel.
    """
    _check_positive(in_size=in_size, kernel_size=kernel_size, stride=stride, dilation=dilation)
    if padding == "same":
        if stride != 1:
            raise ValueError(f"padding='same' is only defined for stride=1, got stride={stride}")
        return in_size
    if padding == "valid":
        padding = 0
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, 'same' or 'valid', got {padding!r}")
    kernel_extent = dilation * (kernel_size - 1) + 1
    padded = in_size + 2 * padding
    if padded < kernel_extent:
        raise ValueError(
            f"the dilated kernel (extent d(k-1)+1 = {kernel_extent}) is larger than the padded "
            f"input (n + 2p = {padded}); lower kernel_size/dilation or add padding"
        )
    return (padded - kernel_extent) // stride + 1


def conv_weight_shape(
    in_channels: int, out_channels: int, kernel_size: int | Sequence[int], groups: int = 1
) -> tuple[int, int, int, int]:
    """nn.Conv2d's weight shape: ``[C_out, C_in / g, k_h, k_w]``."""
    check_groups(in_channels, out_channels, groups)
    kh, kw = _pair(kernel_size, "kernel_size")
    return (out_channels, in_channels // groups, kh, kw)


def conv_parameter_count(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    groups: int = 1,
    bias: bool = True,
) -> int:
    """Weights plus bias: ``C_out * (C_in / g) * k_h * k_w (+ C_out)``."""
    c_out, c_in_per_group, kh, kw = conv_weight_shape(in_channels, out_channels, kernel_size, groups)
    return c_out * c_in_per_group * kh * kw + (c_out if bias else 0)


def conv_macs(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    output_size: int | Sequence[int],
    groups: int = 1,
) -> int:
    """Multiply-accumulates for one example: ``H_out * W_out * C_out * (C_in / g) * k_h * k_w``.

    Every output element is a dot product of the ``(C_in / g) * k_h * k_w``
    weights of its filter with as many inputs. Bias additions are not counted;
    FLOPs (as torch.utils.flop_counter counts them) are ``2 * MACs``.
    """
    c_out, c_in_per_group, kh, kw = conv_weight_shape(in_channels, out_channels, kernel_size, groups)
    h_out, w_out = _pair(output_size, "output_size")
    return h_out * w_out * c_out * c_in_per_group * kh * kw


def separable_parameter_count(in_channels: int, out_channels: int, kernel_size: int, bias: bool = False) -> int:
    """Depthwise ``k x k`` (groups = C_in) then pointwise ``1 x 1``: ``C_in k^2 + C_in C_out``.

    With ``bias=True`` each of the two convs adds its own bias (``C_in + C_out``).
    """
    depthwise = conv_parameter_count(in_channels, in_channels, kernel_size, groups=in_channels, bias=bias)
    pointwise = conv_parameter_count(in_channels, out_channels, 1, bias=bias)
    return depthwise + pointwise


def separable_savings_ratio(out_channels: int, kernel_size: int) -> float:
    """Cost of depthwise-separable over standard conv: ``1 / C_out + 1 / k^2``.

    ``(C_in k^2 + C_in C_out) / (C_out C_in k^2)`` - the same for parameters
    (without bias) and for MACs (both convs have the same output size), and
    independent of ``C_in``. A 3x3 conv with 256 outputs: ``1/256 + 1/9 = 0.115``,
    i.e. about 8.7x fewer parameters and MACs.
    """
    _check_positive(out_channels=out_channels, kernel_size=kernel_size)
    return 1 / out_channels + 1 / kernel_size**2


def conv_kind(module: nn.Module) -> str:
    """Name the layer's role from its shapes.

    * ``"depthwise"``: ``groups == C_in > 1`` (each filter sees one input channel)
    * ``"pointwise"``: 1x1 kernel, ``groups == 1`` (mixes channels, no spatial extent)
    * ``"grouped"``: ``1 < groups < C_in``
    * ``"standard"``: ``groups == 1`` with a larger kernel
    * ``"linear"`` / ``"batchnorm"`` for those layers
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups > 1:
            return "depthwise" if module.groups == module.in_channels else "grouped"
        return "pointwise" if math.prod(module.kernel_size) == 1 else "standard"
    raise TypeError(
        f"conv_kind() takes a Conv1d/2d/3d, Linear or BatchNorm module, got {type(module).__name__}"
    )


# ------------------------------------------------------------ layer table


@dataclass(frozen=True)
class LayerRow:
    """One measured layer. ``output_shape`` and ``macs`` are per example (no batch dim)."""

    name: str
    type: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] | None
    stride: tuple[int, ...] | None
    groups: int
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


@dataclass(frozen=True)
class KindTotal:
    """Layers, parameters and MACs of one kind, with their shares of the table's totals."""

    kind: str
    layers: int
    params: int
    macs: int
    params_share: float
    macs_share: float


def _human(n: float) -> str:
    """``11689512 -> '11.69M'``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


class LayerTable:
    """Rows of :class:`LayerRow` for one model and input, with totals.

    ``str(table)`` prints every row and the totals; ``total_macs`` includes
    BatchNorm's one multiply-add per element, ``conv_linear_macs`` leaves it
    out (the figure papers quote); :meth:`by_kind` splits
    parameters and MACs by layer kind; :meth:`select` keeps some kinds.
    ``uncounted_params`` are parameters in modules no row covers (0 for
    ResNet18 and MobileNetV2).
    """

    def __init__(self, rows: Sequence[LayerRow], input_shape: tuple[int, ...], model_name: str = "",
                 uncounted_params: int = 0) -> None:
        self.rows = list(rows)
        self.input_shape = tuple(input_shape)
        self.model_name = model_name
        self.uncounted_params = uncounted_params

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerRow]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> LayerRow:
        return self.rows[index]

    def row(self, name: str) -> LayerRow:
        """The row of the layer with dotted name ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no layer named {name!r} in the table of {self.model_name or 'this model'}")

    @property
    def total_params(self) -> int:
        """Sum of the rows' parameters."""
        return sum(r.params for r in self.rows)

    @property
    def total_macs(self) -> int:
        """Sum of the rows' MACs per example (``FLOPs = 2 * MACs``)."""
        return sum(r.macs for r in self.rows)

    @property
    def conv_linear_macs(self) -> int:
        """MACs of the conv and linear rows only: the figure papers quote (BatchNorm left out).

        ``2 * conv_linear_macs`` is what torch.utils.flop_counter.FlopCounterMode counts.
        """
        return sum(r.macs for r in self.rows if r.kind in CONV_LINEAR_KINDS)

    def select(self, *kinds: str) -> LayerTable:
        """A table with only the rows of the given kinds (e.g. ``"depthwise"``)."""
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown kind(s) {unknown}; kinds are {list(KINDS)}")
        return LayerTable([r for r in self.rows if r.kind in kinds], self.input_shape, self.model_name)

    def by_kind(self) -> dict[str, KindTotal]:
        """Layers, parameters and MACs per kind (only kinds present), in :data:`KINDS` order."""
        params, macs = max(self.total_params, 1), max(self.total_macs, 1)
        totals = {}
        for kind in KINDS:
            rows = [r for r in self.rows if r.kind == kind]
            if rows:
                p, m = sum(r.params for r in rows), sum(r.macs for r in rows)
                totals[kind] = KindTotal(kind, len(rows), p, m, p / params, m / macs)
        return totals

    def format_by_kind(self) -> str:
        """The :meth:`by_kind` split as a text table with a total line (shares in percent)."""
        header = ["kind", "layers", "params", "params %", "MACs", "MACs %"]
        rows = [[t.kind, t.layers, _human(t.params), 100 * t.params_share, _human(t.macs), 100 * t.macs_share]
                for t in self.by_kind().values()]
        rows.append(["total", len(self), _human(self.total_params), 100.0, _human(self.total_macs), 100.0])
        return format_table(header, rows, floatfmt=".1f", colalign=["left"] + ["right"] * 5)

    def as_dicts(self) -> list[dict]:
        """Rows as plain dicts (for pandas.DataFrame or csv)."""
        return [dict(r.__dict__) for r in self.rows]

    def __str__(self) -> str:
        header = ["name", "type", "in", "out", "kernel", "stride", "groups", "kind", "output", "params", "MACs"]

        def fmt(t: tuple[int, ...] | None) -> str:
            return "-" if t is None else "x".join(map(str, t))

        rows = [[r.name, r.type, r.in_channels, r.out_channels, fmt(r.kernel), fmt(r.stride),
                 r.groups, r.kind, fmt(r.output_shape), f"{r.params:,}", f"{r.macs:,}"] for r in self.rows]
        right = {2, 3, 6, 9, 10}
        table = format_table(header, rows, colalign=["right" if i in right else "left" for i in range(len(header))])
        title = f"{self.model_name or 'model'}, input {fmt(self.input_shape)}"
        totals = (f"total: {len(self)} layers, {self.total_params:,} parameters ({_human(self.total_params)}), "
                  f"{self.total_macs:,} MACs per example ({_human(self.total_macs)}; "
                  f"conv + linear only: {_human(self.conv_linear_macs)})")
        if self.uncounted_params:
            totals += f"; {self.uncounted_params:,} parameters in layers not listed"
        return "\n".join([title, table, totals])

    def __repr__(self) -> str:
        return (f"LayerTable({self.model_name or 'model'}: {len(self)} layers, "
                f"{_human(self.total_params)} params, {_human(self.total_macs)} MACs)")


def _own_parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _layer_row(name: str, module: nn.Module, output: torch.Tensor, batch_size: int) -> LayerRow:
    """Describe one layer from its module and the output of one call."""
    out_per_example = output.numel() // batch_size
    output_shape = tuple(output.shape[1:])
    kind = conv_kind(module)
    if isinstance(module, nn.Linear):
        # each output element: a dot product of in_features inputs
        return LayerRow(name, "Linear", module.in_features, module.out_features, None, None, 1, kind,
                        output_shape, _own_parameter_count(module), out_per_example * module.in_features)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        # eval mode: y = x * scale + shift, one multiply-add per element
        return LayerRow(name, type(module).__name__, module.num_features, module.num_features, None, None, 1,
                        kind, output_shape, _own_parameter_count(module), out_per_example)
    c_in_per_group = module.in_channels // module.groups
    macs = out_per_example * c_in_per_group * math.prod(module.kernel_size)
    return LayerRow(name, type(module).__name__, module.in_channels, module.out_channels,
                    tuple(module.kernel_size), tuple(module.stride), module.groups, kind, output_shape,
                    _own_parameter_count(module), macs)


def _example_input(model: nn.Module, inputs: torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        return inputs
    shape = tuple(inputs)
    if len(shape) < 2 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(
            f"layer_table() needs an example tensor or an input shape with the batch dimension, "
            f"e.g. (1, 3, 224, 224); got {inputs!r}"
        )
    first = next(model.parameters(), None)
    dtype, device = (first.dtype, first.device) if first is not None else (torch.float32, "cpu")
    return torch.zeros(shape, dtype=dtype, device=device)


def layer_table(model: nn.Module, inputs: torch.Tensor | Sequence[int], name: str = "") -> LayerTable:
    """Run one forward pass with hooks and describe every Conv / Linear / BatchNorm layer.

    ``inputs`` is an example tensor or a shape including the batch dimension
    (zeros of that shape are used). The pass runs in eval mode under
    ``torch.no_grad()``; each module's training flag is restored and every hook
    is removed afterwards, also when the forward pass raises. MACs are per
    example (divided by the batch size); a layer called twice counts twice.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"layer_table() takes an nn.Module, got {type(model).__name__}")
    x = _example_input(model, inputs)
    batch_size = x.shape[0]
    rows: dict[str, LayerRow] = {}

    def make_hook(layer_name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            row = _layer_row(layer_name, module, output, batch_size)
            if layer_name in rows:  # a shared module: add this call's MACs
                row = LayerRow(**{**row.__dict__, "macs": rows[layer_name].macs + row.macs})
            rows[layer_name] = row
        return hook

    handles = []
    try:
        for layer_name, module in model.named_modules():
            if isinstance(module, COUNTED_LAYERS):
                handles.append(module.register_forward_hook(make_hook(layer_name)))
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    uncounted = sum(_own_parameter_count(m) for n, m in model.named_modules() if n not in rows)
    return LayerTable(list(rows.values()), tuple(x.shape), name or type(model).__name__, uncounted)
