r"""Calibrators: choose ``amax`` from the data a quantizer sees (notebooks 07 and 09).

Every calibrator has ``collect(x)`` (called on each batch; integer tensors
are cast to float, as pytorch-quantization does), ``compute_amax(...)``
(None while it has seen no data: after construction or ``reset()``) and
``reset()``.

* :class:`MaxCalibrator` — ``amax = max |x|`` over every batch, per tensor or
  per index along ``axis`` (that dimension kept, the others reduced by
  :func:`~fusionlib.quant.amax_along`, so the result broadcasts against x
  like :func:`~fusionlib.quant.amax_shape_for`). Nothing is clipped; rare
  outliers stretch the grid. ``track_amax=True`` also keeps each batch's
  amax in ``amaxs`` (a copy each).
* :class:`HistogramCalibrator` — a histogram of ``|x|`` (``skip_zeros=True``:
  of its non-zero entries) with ``num_bins`` bins of width ``w`` on
  ``[0, num_bins · w)``, ``w`` the smallest power of two with the largest
  ``|x|`` so far strictly inside. A value ``v`` goes to bin ``floor(v / w)``:
  a value on a bin edge counts in the bin it starts, and none sits on the
  upper edge. When a later batch reaches the range, ``w`` is doubled (merging
  neighbouring pairs of bins, which is exact:
  ``floor(v / 2w) = floor(floor(v / w) / 2)``) until it fits. The histogram is therefore always the histogram of
  everything seen, and, because the grid depends only on the overall maximum,
  it is the same whatever order the batches come in. ``compute_amax(method)``:

  - ``"percentile"``: the upper edge ``e_{i+1}`` of the first bin ``i`` whose
    cumulative count reaches ``percentile`` % of all values, capped at the
    largest ``|x|`` seen (beyond it an amax only coarsens the grid).
  - ``"mse"``: the bin centre ``c_i`` (``start_bin <= i <=`` the bin of the largest ``|x|``) minimizing
    ``Σ_b n_b (fq(c_b; c_i) − c_b)²`` over bin centres ``c_b`` with counts
    ``n_b`` (fq = fake quantization at amax ``c_i``): the rounding-versus-clipping
    trade-off of notebook 07. The least-error candidate is returned as is.
  - ``"entropy"``: TensorRT's KL-divergence calibration: for each candidate
    ``i`` from ``start_bin`` to one past the bin of the largest ``|x|``, the reference distribution ``P`` is the first ``i`` bins with
    everything beyond folded into bin ``i − 1``; ``Q`` spreads ``P``'s first
    ``i`` bins over ``2^(num_bits − 1 + unsigned)`` quantization levels
    (each level's count shared evenly among its non-empty bins); the amax is
    the edge ``e_i`` of the ``i`` minimizing ``KL(P ‖ Q) = Σ p log(p / q)``.

Candidates start at ``start_bin`` (signed and unsigned alike) and step by
``stride``, as in pytorch-quantization and TensorRT. ``start_bin`` defaults
to ``num_bins // 16`` (128 of 2048, their default), so a coarser histogram
can still choose an amax below half its range.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from fusionlib.quant.functional import amax_along, check_axis, check_num_bits, fake_quantize

__all__ = ["MaxCalibrator", "HistogramCalibrator", "HISTOGRAM_METHODS"]

HISTOGRAM_METHODS = ("percentile", "mse", "entropy")


def _checked_float(x: torch.Tensor, who: str) -> torch.Tensor:
    """``x`` detached, integers cast to float32; ValueError for a non-tensor, bool / complex, empty or non-finite."""
    if not isinstance(x, torch.Tensor) or x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{who}.collect takes a real tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    x = x.detach() if x.is_floating_point() else x.detach().float()
    if x.numel() == 0:
        raise ValueError(f"{who}.collect got an empty tensor of shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{who}.collect got non-finite values (NaN or inf); amax would be meaningless")
    return x


class MaxCalibrator:
    """Running ``max |x|``, per tensor (``axis=None``) or per index along ``axis`` (dimension kept).

    ``track_amax=True``: ``amaxs`` holds each batch's amax too, a copy each (in collection order).
    """

    def __init__(self, num_bits: int = 8, axis: int | Sequence[int] | None = None, unsigned: bool = False,
                 track_amax: bool = False):
        self.num_bits = check_num_bits(num_bits)
        if axis is not None:
            check_axis(axis)  # type check now; range is checked against each x
        self.axis = axis
        self.unsigned = bool(unsigned)
        self.track_amax = bool(track_amax)
        self.reset()

    def collect(self, x: torch.Tensor) -> None:
        x = _checked_float(x, type(self).__name__)
        batch_amax = amax_along(x, self.axis).float()
        if self.track_amax:
            self.amaxs.append(batch_amax.clone())
        if self._amax is None:
            self._amax = batch_amax.clone()
        else:
            if self._amax.shape != batch_amax.shape:
                raise ValueError(
                    f"MaxCalibrator(axis={self.axis}) collected amax of shape {tuple(self._amax.shape)} before, "
                    f"but this batch gives {tuple(batch_amax.shape)} (x of shape {tuple(x.shape)}); the size along "
                    "the kept axis must not change between batches"
                )
            torch.maximum(self._amax, batch_amax.to(self._amax.device), out=self._amax)

    def compute_amax(self) -> torch.Tensor | None:
        """The running max (a copy): 0-d per tensor, ``amax_shape_for(x.shape, axis)`` per axis; None before any data."""
        return None if self._amax is None else self._amax.clone()

    def reset(self) -> None:
        self._amax: torch.Tensor | None = None
        self.amaxs: list[torch.Tensor] = []

    def __repr__(self) -> str:
        state = "empty" if self._amax is None else f"amax of shape {tuple(self._amax.shape)}"
        return f"MaxCalibrator(num_bits={self.num_bits}, axis={self.axis}, unsigned={self.unsigned}, {state})"


class HistogramCalibrator:
    """Histogram of ``|x|`` with a fixed number of bins whose width doubles when data exceeds the range.

    ``skip_zeros=True`` leaves exact zeros out of the histogram (ReLU outputs,
    pruned weights), so percentiles are of the non-zero values.
    """

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False, num_bins: int = 2048,
                 skip_zeros: bool = False):
        self.num_bits = check_num_bits(num_bits)
        if axis is not None:
            raise ValueError(
                f"HistogramCalibrator calibrates one amax per tensor; got axis={axis!r}. Use MaxCalibrator for "
                "per-channel amax (weights), histograms for activations"
            )
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 16 or num_bins % 2:
            raise ValueError(f"num_bins must be an even int >= 16, got {num_bins!r}")
        self.axis = None
        self.unsigned = bool(unsigned)
        self.num_bins = num_bins
        self.skip_zeros = bool(skip_zeros)
        self.reset()

    def reset(self) -> None:
        self.counts: torch.Tensor | None = None  # float64 [num_bins]
        self.bin_width: float | None = None
        self.max_seen: float | None = None  # the largest |x| collected

    @property
    def range_max(self) -> float | None:
        return None if self.bin_width is None else self.bin_width * self.num_bins

    @property
    def bin_edges(self) -> torch.Tensor:
        if self.bin_width is None:
            raise RuntimeError("HistogramCalibrator has no data: call collect() first")
        return torch.arange(self.num_bins + 1, dtype=torch.float64) * self.bin_width

    def _power_of_two_width(self, max_value: float) -> float:
        """The smallest power of two ``w`` with ``num_bins · w > max_value`` (at least 2^-60)."""
        exponent = math.ceil(math.log2(max_value / self.num_bins)) if max_value > 0 else -60
        width = 2.0 ** max(exponent, -60)
        while width * self.num_bins <= max_value:  # strictly inside; also guards log2's rounding
            width *= 2
        return width

    def collect(self, x: torch.Tensor) -> None:
        a = _checked_float(x, type(self).__name__).abs().float().flatten().cpu()
        if self.skip_zeros:
            a = a[a != 0]
            if a.numel() == 0:
                return
        batch_max = float(a.max())
        self.max_seen = batch_max if self.max_seen is None else max(self.max_seen, batch_max)
        if self.counts is None:
            self.bin_width = self._power_of_two_width(batch_max)
            self.counts = torch.zeros(self.num_bins, dtype=torch.float64)
        while batch_max >= self.range_max:  # widen: merge pairs of bins (exact), so old counts stay right
            self.counts = self.counts.view(-1, 2).sum(dim=1)
            self.counts = torch.cat([self.counts, torch.zeros(self.num_bins // 2, dtype=torch.float64)])
            self.bin_width *= 2
        # bin index floor(|x| / w): every value is below the range's edge (the clamp only guards float rounding)
        idx = torch.clamp((a / self.bin_width).floor().long(), 0, self.num_bins - 1)
        self.counts += torch.bincount(idx, minlength=self.num_bins).double()

    def compute_amax(
        self, method: str, *, percentile: float = 99.99, start_bin: int | None = None, stride: int = 1
    ) -> torch.Tensor | None:
        """amax (a 0-d float32 tensor) by ``"percentile"``, ``"mse"`` or ``"entropy"`` (module docstring); None before any data.

        ``start_bin``: the first candidate bin for ``"mse"`` / ``"entropy"``; None means ``num_bins // 16``.
        """
        if start_bin is None:
            start_bin = max(1, self.num_bins // 16)
        if method not in HISTOGRAM_METHODS:
            raise ValueError(f"method must be one of {HISTOGRAM_METHODS}, got {method!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if isinstance(start_bin, bool) or not isinstance(start_bin, int) or not 1 <= start_bin <= self.num_bins:
            raise ValueError(f"start_bin must be an int in 1..num_bins={self.num_bins}, got {start_bin!r}")
        if method == "percentile" and not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        if self.counts is None:
            return None
        counts, edges = self.counts.numpy().copy(), self.bin_edges.numpy()
        if method == "percentile":
            amax = min(self._amax_percentile(counts, edges, percentile), self.max_seen)
        elif method == "mse":
            amax = self._amax_mse(counts, edges, start_bin, stride)
        else:
            amax = self._amax_entropy(counts, edges, start_bin, stride)
        return torch.tensor(amax, dtype=torch.float32)

    @staticmethod
    def _amax_percentile(counts: np.ndarray, edges: np.ndarray, percentile: float) -> float:
        cdf = np.cumsum(counts) / counts.sum()
        idx = int(np.argmax(cdf >= percentile / 100 - 1e-12))
        return float(edges[idx + 1])

    def _max_bin(self) -> int:
        """The bin holding the largest ``|x|`` seen: candidates stop there, as the original's range ends at max |x|."""
        return min(int(self.max_seen // self.bin_width), self.num_bins - 1)

    def _amax_mse(self, counts: np.ndarray, edges: np.ndarray, start_bin: int, stride: int) -> float:
        centers = torch.from_numpy((edges[:-1] + edges[1:]) / 2)
        weights = torch.from_numpy(counts)
        top = self._max_bin()
        candidates = list(range(min(start_bin, top), top + 1, stride))
        best, best_mse = candidates[-1], float("inf")
        for chunk_start in range(0, len(candidates), 256):
            chunk = candidates[chunk_start : chunk_start + 256]
            amax = centers[chunk].unsqueeze(1)  # [K, 1]
            fq = fake_quantize(centers.expand(len(chunk), -1), amax, self.num_bits, self.unsigned, narrow_range=True)
            mse = (((fq - centers) ** 2) * weights).sum(dim=1)
            k = int(torch.argmin(mse))
            if float(mse[k]) < best_mse:
                best, best_mse = chunk[k], float(mse[k])
        return float(centers[best])

    def _amax_entropy(self, counts: np.ndarray, edges: np.ndarray, start_bin: int, stride: int) -> float:
        bins = counts.copy()
        bins[0] = bins[1]  # TensorRT: the spike at zero (after ReLU) would dominate the divergence
        levels = 1 << (self.num_bits - 1 + int(self.unsigned))
        stop = self._max_bin() + 1
        divergences, arguments = [], []
        for i in range(min(start_bin, stop), stop + 1, stride):
            ref = bins[:i].copy()
            ref[-1] += bins[i:].sum()
            j = np.arange(i)
            level = (j * levels) // i  # which quantization level bin j merges into
            nonzero = bins[:i] != 0
            level_sum = np.bincount(level[nonzero], weights=bins[:i][nonzero], minlength=levels)
            level_n = np.bincount(level[nonzero], minlength=levels)
            per_bin = np.divide(level_sum, level_n, out=np.zeros(levels), where=level_n > 0)
            q = np.where(nonzero, per_bin[level], 0.0)
            p = ref / ref.sum()
            qs = q.sum()
            if qs <= 0:
                continue
            q = q / qs
            support = p > 0
            if np.any(q[support] == 0):
                kl = np.inf
            else:
                kl = float(np.sum(p[support] * np.log(p[support] / q[support])))
            divergences.append(kl)
            arguments.append(i)
        if not arguments:
            return float(edges[-1])
        divergences = np.asarray(divergences)
        last_argmin = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
        return float(edges[arguments[last_argmin]])

    def __repr__(self) -> str:
        state = "empty" if self.counts is None else f"range [0, {self.range_max:.4g}], {int(self.counts.sum())} values"
        skip = ", skip_zeros" if self.skip_zeros else ""
        return f"HistogramCalibrator(num_bits={self.num_bits}, unsigned={self.unsigned}, num_bins={self.num_bins}{skip}, {state})"
