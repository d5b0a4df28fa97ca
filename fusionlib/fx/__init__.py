"""torch.fx for inference: trace a model, then rewrite its graph.

* :mod:`~fusionlib.fx.tracing`: :func:`symbolic_trace` with clear errors
  (:class:`FxTraceError`), :func:`wrap` / :func:`global_wrap` for leaf functions,
  :func:`print_tabular`.
* :mod:`~fusionlib.fx.fusion`: :func:`fuse_conv_bn`, automatic Conv/Linear + BatchNorm
  folding with a :class:`FusionReport`.
* :mod:`~fusionlib.fx.passes`: :func:`replace_ops`, no-op removal and
  :func:`optimize_for_inference` (a pipeline of named passes).
* :mod:`~fusionlib.fx.layout`: channels-last and MKLDNN layout passes.
* :mod:`~fusionlib.fx.profiling`: :class:`ProfilingInterpreter`, per-node timings.
"""
from __future__ import annotations

from fusionlib.fx.fusion import FusedPair, FusionReport, SkippedBatchNorm, count_batchnorm_nodes, fuse_conv_bn
from fusionlib.fx.layout import MkldnnConv2d, choose_layout, mkldnn_regions, to_channels_last, to_mkldnn
from fusionlib.fx.passes import (
    DEFAULT_PASSES,
    PASSES,
    OptimizationReport,
    fold_batchnorm,
    max_relative_error,
    optimize_for_inference,
    remove_dropout,
    remove_identity,
    replace_ops,
)
from fusionlib.fx.profiling import ProfileTable, ProfilingInterpreter
from fusionlib.fx.tracing import FxTraceError, format_tabular, global_wrap, print_tabular, symbolic_trace, wrap

__all__ = [
    "symbolic_trace",
    "FxTraceError",
    "wrap",
    "global_wrap",
    "print_tabular",
    "format_tabular",
    "fuse_conv_bn",
    "FusionReport",
    "FusedPair",
    "SkippedBatchNorm",
    "count_batchnorm_nodes",
    "replace_ops",
    "fold_batchnorm",
    "remove_dropout",
    "remove_identity",
    "optimize_for_inference",
    "OptimizationReport",
    "PASSES",
    "DEFAULT_PASSES",
    "max_relative_error",
    "to_mkldnn",
    "to_channels_last",
    "choose_layout",
    "mkldnn_regions",
    "MkldnnConv2d",
    "ProfilingInterpreter",
    "ProfileTable",
]
