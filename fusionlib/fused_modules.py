"""Fused containers: ``nn.Sequential`` subclasses named like ``torch.ao.nn.intrinsic``'s.

:func:`fusionlib.fusion.fuse_modules` puts what BatchNorm folding cannot remove
into one of these, so the fused group stays one module under the first name:

* eval fusion: a ReLU after a conv / linear / BatchNorm
  (``ConvReLU1d/2d/3d``, ``LinearReLU``, ``BNReLU1d/2d/3d``; Conv+BN+ReLU
  becomes ``ConvReLUNd(folded conv, relu)``);
* ``fuse_modules_qat``: Conv+BN(+ReLU) and Linear+BN whose BatchNorm keeps
  training (``ConvBn1d/2d/3d``, ``ConvBnReLU1d/2d/3d``, ``LinearBn1d``).

Each class lists the module types it takes in ``module_types`` and checks them
on construction (a subclass that keeps its parent's ``forward``, e.g.
``class MyConv(nn.Conv2d)`` adding only a method, counts as its parent: see
:func:`fusionlib.folding.stock_forward_base`); its forward is ``nn.Sequential``'s (each module in turn), and
its ``training`` flag is copied from the first module. ``BNReLU1d`` has no
torch namesake (torch.ao only fuses BatchNorm2d/3d + ReLU).
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from fusionlib.folding import FusionError, stock_forward_base

__all__ = [
    "FusedSequential",
    "ConvReLU1d",
    "ConvReLU2d",
    "ConvReLU3d",
    "LinearReLU",
    "BNReLU1d",
    "BNReLU2d",
    "BNReLU3d",
    "ConvBn1d",
    "ConvBn2d",
    "ConvBn3d",
    "ConvBnReLU1d",
    "ConvBnReLU2d",
    "ConvBnReLU3d",
    "LinearBn1d",
]


class FusedSequential(nn.Sequential):
    """A Sequential that runs a fixed sequence of module types.

    Eval fusion uses it for what BN folding cannot remove (a trailing ReLU);
    fuse_modules_qat for Conv+BN(+ReLU) whose BatchNorm keeps training.
    """

    module_types: tuple[type[nn.Module], ...] = ()

    def __init__(self, *modules: nn.Module) -> None:
        types = tuple(_computes_as(type_before_parametrizations(m)) for m in modules)
        if types != self.module_types:
            got = ", ".join(t.__name__ for t in types)
            want = ", ".join(t.__name__ for t in self.module_types)
            raise FusionError(f"{type(self).__name__} takes ({want}), got ({got}).")
        super().__init__(*modules)
        self.training = modules[0].training


def _computes_as(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls``, or the torch class it subclasses without changing ``forward``."""
    return stock_forward_base(cls) or cls


# --------------------------------------------------------------------------
# Layer + ReLU (eval fusion, and Conv+ReLU / Linear+ReLU in QAT)
# --------------------------------------------------------------------------
class ConvReLU1d(FusedSequential):
    """Conv1d then ReLU, as one fused unit."""

    module_types = (nn.Conv1d, nn.ReLU)


class ConvReLU2d(FusedSequential):
    """Conv2d then ReLU, as one fused unit."""

    module_types = (nn.Conv2d, nn.ReLU)


class ConvReLU3d(FusedSequential):
    """Conv3d then ReLU, as one fused unit."""

    module_types = (nn.Conv3d, nn.ReLU)


class LinearReLU(FusedSequential):
    """Linear then ReLU, as one fused unit."""

    module_types = (nn.Linear, nn.ReLU)


class BNReLU1d(FusedSequential):
    """BatchNorm1d then ReLU, as one fused unit (no torch.ao namesake)."""

    module_types = (nn.BatchNorm1d, nn.ReLU)


class BNReLU2d(FusedSequential):
    """BatchNorm2d then ReLU, as one fused unit."""

    module_types = (nn.BatchNorm2d, nn.ReLU)


class BNReLU3d(FusedSequential):
    """BatchNorm3d then ReLU, as one fused unit."""

    module_types = (nn.BatchNorm3d, nn.ReLU)


# --------------------------------------------------------------------------
# Layer + trainable BatchNorm (+ ReLU): fuse_modules_qat
# --------------------------------------------------------------------------
class ConvBn1d(FusedSequential):
    """Conv1d then BatchNorm1d, BatchNorm still training (fuse_modules_qat)."""

    module_types = (nn.Conv1d, nn.BatchNorm1d)


class ConvBn2d(FusedSequential):
    """Conv2d then BatchNorm2d, BatchNorm still training (fuse_modules_qat)."""

    module_types = (nn.Conv2d, nn.BatchNorm2d)


class ConvBn3d(FusedSequential):
    """Conv3d then BatchNorm3d, BatchNorm still training (fuse_modules_qat)."""

    module_types = (nn.Conv3d, nn.BatchNorm3d)


class ConvBnReLU1d(FusedSequential):
    """Conv1d, BatchNorm1d, ReLU; BatchNorm still training (fuse_modules_qat)."""

    module_types = (nn.Conv1d, nn.BatchNorm1d, nn.ReLU)


class ConvBnReLU2d(FusedSequential):
    """Conv2d, BatchNorm2d, ReLU; BatchNorm still training (fuse_modules_qat)."""

    module_types = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)


class ConvBnReLU3d(FusedSequential):
    """Conv3d, BatchNorm3d, ReLU; BatchNorm still training (fuse_modules_qat)."""

    module_types = (nn.Conv3d, nn.BatchNorm3d, nn.ReLU)


class LinearBn1d(FusedSequential):
    """Linear then BatchNorm1d, BatchNorm still training (fuse_modules_qat)."""

    module_types = (nn.Linear, nn.BatchNorm1d)


#: Which container each layer type goes into, by fused sequence.
CONV_RELU: dict[type[nn.Module], type[FusedSequential]] = {
    nn.Conv1d: ConvReLU1d, nn.Conv2d: ConvReLU2d, nn.Conv3d: ConvReLU3d,
}
CONV_BN: dict[type[nn.Module], type[FusedSequential]] = {
    nn.Conv1d: ConvBn1d, nn.Conv2d: ConvBn2d, nn.Conv3d: ConvBn3d,
}
CONV_BN_RELU: dict[type[nn.Module], type[FusedSequential]] = {
    nn.Conv1d: ConvBnReLU1d, nn.Conv2d: ConvBnReLU2d, nn.Conv3d: ConvBnReLU3d,
}
