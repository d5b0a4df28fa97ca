r"""Structural re-parameterization: train several branches, deploy one convolution (notebook 06).

A RepVGG / ACNet / MobileOne block sums parallel branches that all read the
same input ``x`` (``*`` is convolution with stride ``s``, groups ``g``)::

    y = BN_k(W_k * x) + BN_1(W_1 * x) + BN_0(x)        kxk branch + 1x1 branch + identity branch

In eval mode every BatchNorm is a fixed affine map (``s = γ/√(σ² + ε)``), and
convolution is linear, so the sum collapses into one convolution
``y = W * x + b`` with::

    W = fold(W_k) + pad_k(fold(W_1)) + fold(I)          b = b_k + b_1 + b_0

using three small identities:

* **BN fold** (:func:`fold_bn`, the notebook-02 formula reused from
  :mod:`fusionlib.folding`): ``BN(W * x + b) = (W·s) * x + (b − μ)·s + β``.
* **Padding a 1x1 kernel to kxk** (:func:`pad_kernel_to`): ``P_k(W_1)`` holds
  ``W_1`` at the centre tap ``(k//2, k//2)`` and zeros elsewhere. With padding
  ``k//2`` it reads, at every output position, the same input pixel the 1x1
  conv reads with padding 0, so ``W_1 * x == P_k(W_1) * x`` (same stride).
* **The identity as a kernel** (:func:`identity_kernel`): a grouped conv's
  filter ``o`` sees only the ``C/g`` input channels of its group, and input
  channel ``o`` is the ``(o mod C/g)``-th of them, so
  ``I[o, o mod (C/g), k//2, k//2] = 1`` (zeros elsewhere) gives ``I * x = x``.
  Dense: ``I[o, o]`` at the centre; depthwise (``g = C``): every filter is a
  single 1 at the centre.

Summing is exact because all branches share the output grid. That needs an
odd ``k``, padding ``k//2`` on the kxk conv and 0 on the 1x1 conv (their
centres coincide), the same stride and groups on every branch, and, for the
identity, ``in_channels == out_channels`` and stride 1.

Precision, as :func:`fusionlib.folding.fuse_conv_bn_weights`: every fold,
pad and sum is done in float64 and the result is rounded once, at the end
(:func:`merge_branches`), to the weight's dtype.

Public names: :func:`pad_kernel_to`, :func:`identity_kernel`, :func:`fold_bn`,
:func:`merge_branches` (the algebra); :func:`merge_conv_branches` (the seed
example without BatchNorm, over existing modules); :class:`RepBlock` (the
re-parameterizable block); :func:`reparameterize_model` and
:func:`count_rep_blocks` (whole models).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionlib.arguments import check_positive_int
from fusionlib.folding import _as_parameters, fuse_conv_bn_weights, round_to_nearest
from fusionlib.modules import warn_dropped_hooks

__all__ = [
    "pad_kernel_to",
    "identity_kernel",
    "fold_bn",
    "merge_branches",
    "merge_conv_branches",
    "RepBlock",
    "reparameterize_model",
    "count_rep_blocks",
]

_EXACT = torch.float64  # the dtype every branch is folded, padded and summed in


# --------------------------------------------------------------------------
# Argument checks (each error names the bad value and says what would work)
# --------------------------------------------------------------------------
def _check_odd_kernel(kernel_size: int, what: str = "kernel_size") -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"{what} must be a positive odd int, got {kernel_size!r}: an even kernel has no centre tap, so a "
            "1x1 branch or the identity cannot be placed on it; use 1, 3, 5, ..."
        )


def _check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    bad = [f"{n}={v}" for n, v in (("in_channels", in_channels), ("out_channels", out_channels)) if v % groups]
    if bad:
        raise ValueError(
            f"groups={groups} must divide in_channels and out_channels, but it does not divide {' and '.join(bad)}; "
            f"pick groups among the common divisors of {in_channels} and {out_channels}"
        )


# --------------------------------------------------------------------------
# The branch algebra: tensors in, tensors out
# --------------------------------------------------------------------------
def pad_kernel_to(kernel: torch.Tensor, k: int) -> torch.Tensor:
    r"""Zero-pad a ``[O, I, k0, k0]`` kernel centrally to ``[O, I, k, k]`` (``k0``, ``k`` odd, ``k0 <= k``).

    With ``p = (k − k0)/2``::

        P_k(W)[o, i, u, v] = W[o, i, u − p, v − p]   if p <= u, v < p + k0,   else 0

    A kxk conv with padding ``k//2`` and kernel ``P_k(W)`` equals the k0xk0
    conv with padding ``k0//2`` and kernel ``W`` (same stride): the extra taps
    are zeros and the centres coincide. Returns a new tensor of the kernel's dtype.
    """
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 4 or kernel.shape[2] != kernel.shape[3]:
        shape = tuple(kernel.shape) if isinstance(kernel, torch.Tensor) else type(kernel).__name__
        raise ValueError(f"pad_kernel_to takes a square [O, I, k0, k0] kernel, got shape {shape}")
    k0 = kernel.shape[2]
    _check_odd_kernel(k0, "the kernel's size k0")
    _check_odd_kernel(k, "k")
    if k0 > k:
        raise ValueError(f"cannot pad a {k0}x{k0} kernel to the smaller size k={k}; k must be >= {k0}")
    p = (k - k0) // 2
    return F.pad(kernel, (p, p, p, p))


def identity_kernel(
    channels: int,
    kernel_size: int,
    groups: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""The ``[C, C/g, k, k]`` kernel whose (padding ``k//2``, stride 1) convolution is the identity.

    Filter ``o`` of a conv with ``g`` groups sees only the ``C/g`` input
    channels of its group ``o // (C/g)``; input channel ``o`` is the
    ``(o mod C/g)``-th of them. So::

        I[o, o mod (C/g), k//2, k//2] = 1,   every other entry 0

    Dense (``g = 1``): ``I[o, o]`` at the centre. Depthwise (``g = C``): shape
    ``[C, 1, k, k]``, a single 1 at each filter's centre.
    """
    check_positive_int("channels", channels)
    check_positive_int("groups", groups)
    _check_odd_kernel(kernel_size)
    if channels % groups:
        raise ValueError(
            f"groups={groups} must divide channels={channels}: each group sees channels/groups input channels"
        )
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=dtype, device=device)
    out = torch.arange(channels, device=device)
    kernel[out, out % per_group, kernel_size // 2, kernel_size // 2] = 1
    return kernel


def fold_bn(
    kernel: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One branch ``BN(W * x + b)`` as a kernel and a bias, in float64 (not rounded).

    With ``s = γ/√(σ² + ε)`` per output channel (notebook 02,
    :func:`fusionlib.folding.fuse_conv_bn_weights`)::

        W' = W · s          b' = (b − μ) · s + β          (b = 0 when ``bias`` is None)

    The result stays float64 so :func:`merge_branches` can sum the branches
    before rounding once. ``bn`` must be in eval mode with running statistics.
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"fold_bn folds a BatchNorm, got {type(bn).__name__}")
    if bn.training:
        raise ValueError(
            f"Cannot fold {type(bn).__name__}({bn.num_features}) in training mode, where it normalizes with "
            "batch statistics; call model.eval() first."
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"Cannot fold {type(bn).__name__}({bn.num_features}): it has track_running_stats=False, so it is "
            "not a fixed affine map."
        )
    if kernel.shape[0] != bn.num_features:
        raise ValueError(
            f"kernel of shape {tuple(kernel.shape)} has {kernel.shape[0]} output channels but the BatchNorm has "
            f"num_features={bn.num_features}; they must be equal"
        )
    exact_bias = None if bias is None else bias.detach().to(_EXACT)
    weight, shift = fuse_conv_bn_weights(
        kernel.detach().to(_EXACT), exact_bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    return weight.detach(), shift.detach()


def merge_branches(
    branches: Sequence[tuple[torch.Tensor, torch.Tensor | None]], kernel_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Sum branches ``(W_j, b_j)`` into one kernel and bias, rounded once to ``dtype``.

    ::

        W = Σ_j P_k(W_j)          b = Σ_j b_j          (P_k: :func:`pad_kernel_to`, k = kernel_size)

    Every kernel is ``[O, C_in/g, k_j, k_j]`` with odd ``k_j <= k``; a bias of
    ``None`` counts as zero. The sum is taken in float64 and rounded to
    ``dtype`` at the end, to the nearest number
    (:func:`fusionlib.folding.round_to_nearest`: torch's float64 -> fp16 / bf16
    goes through float32 and rounds twice).
    """
    weight, bias = _sum_branches(branches, kernel_size)
    return round_to_nearest(weight, dtype), round_to_nearest(bias, dtype)


def _sum_branches(
    branches: Sequence[tuple[torch.Tensor, torch.Tensor | None]], kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_branches` before the rounding: ``(Σ P_k(W_j), Σ b_j)`` in float64."""
    if len(branches) == 0:
        raise ValueError("merge_branches needs at least one (kernel, bias) branch, got none")
    _check_odd_kernel(kernel_size)
    shapes = [tuple(w.shape[:2]) for w, _ in branches]
    if len(set(shapes)) != 1:
        raise ValueError(
            f"every branch kernel must have the same [out_channels, in_channels/groups], got "
            f"{[tuple(w.shape) for w, _ in branches]}"
        )
    out_channels = shapes[0][0]
    weight = torch.zeros(*shapes[0], kernel_size, kernel_size, dtype=_EXACT, device=branches[0][0].device)
    bias = torch.zeros(out_channels, dtype=_EXACT, device=weight.device)
    with torch.no_grad():
        for kernel, branch_bias in branches:
            weight += pad_kernel_to(kernel.detach().to(_EXACT), kernel_size)
            if branch_bias is not None:
                if branch_bias.shape != (out_channels,):
                    raise ValueError(
                        f"a branch bias has shape {tuple(branch_bias.shape)}, expected ({out_channels},)"
                    )
                bias += branch_bias.detach().to(_EXACT)
    return weight, bias


def _conv_from_branches(
    branches: Sequence[tuple[torch.Tensor, torch.Tensor | None]], like: nn.Conv2d
) -> nn.Conv2d:
    """A new kxk ``Conv2d`` with ``like``'s settings and a bias, holding the branches' sum.

    Rounded once to ``like.weight``'s dtype and laid out like it (channels_last stays channels_last), with
    its ``requires_grad`` (:func:`fusionlib.folding._as_parameters`, the fold's rounding).
    """
    k = like.kernel_size[0]
    weight, bias = _sum_branches(branches, k)
    conv = nn.Conv2d(like.in_channels, like.out_channels, k, like.stride, k // 2, groups=like.groups, bias=True,
                     device="meta")
    conv.weight, conv.bias = _as_parameters(weight, bias, like.weight, None)
    return conv


# --------------------------------------------------------------------------
# The seed example without BatchNorm: conv_kxk(x) + conv_1x1(x) + x -> one Conv2d
# --------------------------------------------------------------------------
def _conv_settings(conv: nn.Conv2d) -> dict[str, object]:
    return {
        "stride": conv.stride, "groups": conv.groups, "dilation": conv.dilation,
        "padding_mode": conv.padding_mode, "in_channels": conv.in_channels, "dtype": conv.weight.dtype,
    }


def _check_merge_inputs(conv_kxk: nn.Conv2d, conv_1x1: nn.Conv2d | None, identity: bool) -> None:
    for name, conv in (("conv_kxk", conv_kxk), ("conv_1x1", conv_1x1)):
        if conv is not None and type(conv) is not nn.Conv2d:
            raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    kh, kw = conv_kxk.kernel_size
    if kh != kw:
        raise ValueError(f"conv_kxk must have a square kernel, got kernel_size={conv_kxk.kernel_size}")
    _check_odd_kernel(kh, "conv_kxk's kernel size")
    if conv_kxk.padding != (kh // 2, kh // 2):
        raise ValueError(
            f"conv_kxk has padding={conv_kxk.padding}, but only padding={kh // 2} (k//2) keeps its centre tap "
            "on the 1x1 branch's and the identity's pixel; use padding=k//2"
        )
    if conv_kxk.dilation != (1, 1):
        raise ValueError(f"conv_kxk has dilation={conv_kxk.dilation}; only dilation 1 is supported")
    if conv_kxk.padding_mode != "zeros":
        raise ValueError(f"conv_kxk has padding_mode={conv_kxk.padding_mode!r}; only 'zeros' pads like the merge")
    if conv_1x1 is not None:
        if conv_1x1.kernel_size != (1, 1):
            raise ValueError(f"conv_1x1 must have kernel_size 1, got {conv_1x1.kernel_size}")
        if conv_1x1.padding != (0, 0):
            raise ValueError(
                f"conv_1x1 has padding={conv_1x1.padding}, which shifts its output grid against conv_kxk's; "
                "use padding=0"
            )
        mine, theirs = _conv_settings(conv_kxk), _conv_settings(conv_1x1)
        for key in mine:
            if mine[key] != theirs[key]:
                raise ValueError(
                    f"conv_kxk has {key}={mine[key]} but conv_1x1 has {key}={theirs[key]}; the branches must "
                    f"agree on {key}"
                )
        if conv_1x1.out_channels != conv_kxk.out_channels:
            raise ValueError(
                f"conv_kxk has out_channels={conv_kxk.out_channels} but conv_1x1 has "
                f"out_channels={conv_1x1.out_channels}; the branch outputs are summed, so they must be equal"
            )
    if identity:
        if conv_kxk.in_channels != conv_kxk.out_channels:
            raise ValueError(
                f"identity=True needs in_channels == out_channels, got in_channels={conv_kxk.in_channels}, "
                f"out_channels={conv_kxk.out_channels}"
            )
        if conv_kxk.stride != (1, 1):
            raise ValueError(
                f"identity=True needs stride 1 (x keeps its size), got stride={conv_kxk.stride}"
            )


def merge_conv_branches(
    conv_kxk: nn.Conv2d, conv_1x1: nn.Conv2d | None = None, identity: bool = False
) -> nn.Conv2d:
    r"""One new ``nn.Conv2d`` computing ``conv_kxk(x) + conv_1x1(x) + x`` (the seed example, no BatchNorm).

    ::

        W = W_k + P_k(W_1) + I          b = b_k + b_1          (missing biases are 0)

    ``I`` is :func:`identity_kernel` (for ``identity=True``, which needs
    ``in_channels == out_channels`` and stride 1). The branches must share
    stride, groups and channels; ``conv_kxk`` needs an odd square kernel and
    padding ``k//2``, ``conv_1x1`` padding 0. The result is a new module with
    ``conv_kxk``'s settings and a bias; the inputs are not modified.
    Mismatches raise ``ValueError`` naming the values.
    """
    _check_merge_inputs(conv_kxk, conv_1x1, identity)
    k = conv_kxk.kernel_size[0]
    branches: list[tuple[torch.Tensor, torch.Tensor | None]] = [(conv_kxk.weight, conv_kxk.bias)]
    if conv_1x1 is not None:
        branches.append((conv_1x1.weight, conv_1x1.bias))
    if identity:
        branches.append((identity_kernel(conv_kxk.in_channels, k, conv_kxk.groups, _EXACT, conv_kxk.weight.device),
                         None))
    return _conv_from_branches(branches, conv_kxk)


# --------------------------------------------------------------------------
# The re-parameterizable block
# --------------------------------------------------------------------------
class RepBlock(nn.Module):
    r"""kxk conv+BN, 1x1 conv+BN and an identity BN, summed; one kxk conv after :meth:`reparameterize`.

    Training form (no activation inside the block)::

        y = conv_kxk(x) + conv_1x1(x) + identity(x)
          = BN_k(W_k * x) + BN_1(W_1 * x) + BN_0(x)

    * ``.conv_kxk``: ``nn.Sequential(Conv2d(k, stride, padding=k//2, groups, bias=False), BatchNorm2d)``
    * ``.conv_1x1``: ``nn.Sequential(Conv2d(1, stride, padding=0, groups, bias=False), BatchNorm2d)``,
      or None (``use_1x1=False``)
    * ``.identity``: ``BatchNorm2d(in_channels)`` or None. ``use_identity=None``
      (default) adds it exactly when ``in_channels == out_channels`` and
      ``stride == 1``; ``use_identity=True`` requires both.

    Deployed form (:meth:`reparameterize`, eval mode only): ``.deployed`` is one
    ``Conv2d(k, stride, padding=k//2, groups, bias=True)`` with::

        W = fold(W_k) + P_k(fold(W_1)) + fold(I)       b = b_k + b_1 + b_0

    and the three branch attributes become None. Works for dense, grouped and
    depthwise (``groups == in_channels == out_channels``) convolutions.
    ``deploy=True`` builds the deployed form directly (as RepVGG's official
    code does), so a deployed block's ``state_dict`` loads into a fresh one.

    Construction errors (``ValueError`` naming the value): even or non-positive
    ``kernel_size``; ``padding`` other than ``k//2`` (the only value that keeps
    the kxk, 1x1 and identity outputs on the same pixels); ``groups`` not
    dividing both channel counts; an identity asked for with
    ``in_channels != out_channels`` or ``stride != 1``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        use_identity: bool | None = None,
        use_1x1: bool = True,
        *,
        padding: int | None = None,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride),
                            ("groups", groups)):
            check_positive_int(name, value)
        _check_odd_kernel(kernel_size)
        if padding is not None and padding != kernel_size // 2:
            raise ValueError(
                f"padding={padding!r} would misalign the branches: the kxk branch's centre tap sits on the 1x1 "
                f"branch's and the identity's pixel only with padding=k//2={kernel_size // 2} (1x1 padding 0); "
                "leave padding=None"
            )
        _check_groups(in_channels, out_channels, groups)
        can_have_identity = in_channels == out_channels and stride == 1
        if use_identity is None:
            use_identity = can_have_identity
        elif use_identity and not can_have_identity:
            raise ValueError(
                f"use_identity=True needs in_channels == out_channels and stride == 1 (x must have the output's "
                f"shape), got in_channels={in_channels}, out_channels={out_channels}, stride={stride}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.padding = kernel_size // 2
        self.use_identity, self.use_1x1 = bool(use_identity), bool(use_1x1)
        self.conv_kxk: nn.Sequential | None
        self.conv_1x1: nn.Sequential | None
        self.identity: nn.BatchNorm2d | None
        self.deployed: nn.Conv2d | None
        for name in ("conv_kxk", "conv_1x1", "identity", "deployed"):  # both forms list all four, in this order
            self.register_module(name, None)
        if deploy:  # the deployed form directly, e.g. to load a deployed block's state_dict
            self.deployed = nn.Conv2d(in_channels, out_channels, kernel_size, stride, self.padding, groups=groups,
                                      bias=True)
            return
        self.conv_kxk = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, self.padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if use_1x1:
            self.conv_1x1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, 0, groups=groups,
                                                    bias=False), nn.BatchNorm2d(out_channels))
        if use_identity:
            self.identity = nn.BatchNorm2d(in_channels)

    @property
    def is_deployed(self) -> bool:
        """True after :meth:`reparameterize`: the block is one convolution."""
        return self.deployed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed is not None:
            return self.deployed(x)
        out = self.conv_kxk(x)
        if self.conv_1x1 is not None:
            out = out + self.conv_1x1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, deployed={self.is_deployed}")

    def branch_kernels(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        r"""Each branch's BN-folded ``(name, W', b')`` in float64, unpadded (``W_1`` stays 1x1).

        ``W' = W·s, b' = −μ·s + β`` per branch (:func:`fold_bn`); the identity
        branch's ``W`` is :func:`identity_kernel`. Eval mode only.
        """
        self._check_eval_mode()
        branches = [("kxk", *_fold_branch(*self.conv_kxk))]
        if self.conv_1x1 is not None:
            branches.append(("1x1", *_fold_branch(*self.conv_1x1)))
        if self.identity is not None:
            device = self.identity.running_mean.device
            kernel = identity_kernel(self.in_channels, self.kernel_size, self.groups, _EXACT, device)
            branches.append(("identity", *fold_bn(kernel, None, self.identity)))
        return branches

    def deployed_conv(self) -> nn.Conv2d:
        """A new Conv2d equal to this block in eval mode (the block itself is not changed).

        Its weight is rounded once to the kxk conv's dtype and laid out like it (channels_last stays).
        """
        if self.deployed is not None:
            return copy.deepcopy(self.deployed)
        return _conv_from_branches([(w, b) for _, w, b in self.branch_kernels()], self.conv_kxk[0])

    def reparameterize(self) -> RepBlock:
        """Switch in place to ``.deployed`` (one conv with bias) and drop the branches; returns ``self``.

        Calling it again is harmless (nothing changes). In training mode it
        raises ``ValueError``: BatchNorm would then use the batch's
        statistics, which no fixed kernel can reproduce.
        """
        if self.deployed is None:
            self._switch_to(self.deployed_conv())
        return self

    def _switch_to(self, conv: nn.Conv2d, name: str = "") -> None:
        """Replace the branches by ``conv``; a hook on a branch module is named in a warning (hook policy:
        :func:`fusionlib.modules.warn_dropped_hooks`). ``name``: the block's name in its model."""
        prefix = f"{name}." if name else ""
        for branch in ("conv_kxk", "conv_1x1", "identity"):
            for sub, module in (getattr(self, branch) or nn.Identity()).named_modules(prefix=prefix + branch):
                warn_dropped_hooks(module, sub, f"the branches are merged into one conv, '{prefix}deployed'")
        conv.train(self.training)
        self.deployed = conv
        self.conv_kxk = None
        self.conv_1x1 = None
        self.identity = None

    def _training_modules(self, prefix: str = "") -> list[str]:
        return [name or "<block>" for name, m in self.named_modules(prefix=prefix) if m.training]

    def _check_eval_mode(self) -> None:
        training = self._training_modules()
        if training:
            raise ValueError(
                f"RepBlock.reparameterize needs eval mode: in training mode BatchNorm normalizes with the batch's "
                f"statistics, which no fixed kernel reproduces. Modules in training mode: "
                f"{', '.join(repr(n) for n in training)}; call model.eval() first."
            )


def _fold_branch(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` of a (conv, bn) branch in float64; a BN already folded (``nn.Identity``) leaves ``(W, b)``."""
    if isinstance(bn, nn.Identity):  # e.g. after fusionlib.models.fuse_model folded the branch's own conv-bn pair
        bias = torch.zeros(conv.out_channels) if conv.bias is None else conv.bias.detach()
        return conv.weight.detach().to(_EXACT), bias.to(device=conv.weight.device, dtype=_EXACT)
    return fold_bn(conv.weight, conv.bias, bn)


# --------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------
def count_rep_blocks(model: nn.Module) -> int:
    """How many :class:`RepBlock` modules ``model`` holds (deployed or not)."""
    return sum(isinstance(m, RepBlock) for m in model.modules())


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Reparameterize every :class:`RepBlock` of ``model``; returns the model.

    ``inplace=False`` (default) works on a deep copy and never touches the
    caller's model. Raises ``ValueError`` naming the modules inside RepBlocks
    that are in training mode; every new convolution is computed before any
    block is switched, so nothing is half-applied. Blocks already deployed are
    left as they are, so converting twice is harmless. Hooks on a block stay
    (the block stays); a hook on a branch module, which disappears, is named
    in a ``UserWarning``. The deployed weights keep the kxk conv's memory
    format (channels_last).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparameterize_model takes an nn.Module, got {type(model).__name__}")
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, RepBlock) and not m.is_deployed]
    training = [n for name, block in blocks for n in block._training_modules(prefix=name)]
    if training:
        shown = ", ".join(f"'{n}'" for n in training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5
                                                           else "")
        raise ValueError(
            f"reparameterize_model needs eval mode: in training mode BatchNorm normalizes with the batch's "
            f"statistics, which no fixed kernel reproduces. '{type(model).__name__}' has RepBlock modules in "
            f"training mode ({shown}); call model.eval() first."
        )
    if not inplace:
        model = copy.deepcopy(model)
        blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, RepBlock) and not m.is_deployed]
    planned = [(name, block, block.deployed_conv()) for name, block in blocks]  # 1. compute everything
    for name, block, conv in planned:  # 2. then switch
        block._switch_to(conv, name)
    return model
