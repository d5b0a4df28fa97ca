"""fusionlib.quant.calibrators: max per tensor / per axis, histogram percentile / mse / entropy, batches out of range."""
from __future__ import annotations

import pytest
import torch

from fusionlib import data, zoo
from fusionlib.quant import HistogramCalibrator, MaxCalibrator, amax_shape_for, fake_quantize


def batches(seed=0, n=4, scales=(1.0, 1.0, 1.0, 1.0)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 6, 5, 5, generator=g) * s for s in scales[:n]]


# ----------------------------------------------------------------------------- max
def test_max_calibrator_per_tensor_is_the_running_max():
    xs = batches(scales=(1.0, 3.0, 0.5, 2.0))
    cal = MaxCalibrator(8)
    for x in xs:
        cal.collect(x)
    amax = cal.compute_amax()
    assert amax.shape == () and torch.equal(amax, torch.cat([x.flatten() for x in xs]).abs().max())


@pytest.mark.parametrize("axis", [0, 1, -1, (0, 1)])
def test_max_calibrator_per_axis_keeps_the_dimension(axis):
    xs = batches(scales=(1.0, 3.0, 0.5, 2.0))
    cal = MaxCalibrator(8, axis=axis)
    for x in xs:
        cal.collect(x)
    amax = cal.compute_amax()
    assert amax.shape == amax_shape_for(xs[0].shape, axis)
    stacked = torch.stack(xs).abs().amax(dim=0)
    kept = (axis,) if isinstance(axis, int) else axis
    kept = tuple(a % 4 for a in kept)
    expected = stacked.amax(dim=tuple(d for d in range(4) if d not in kept), keepdim=True)
    assert torch.equal(amax, expected)
    assert fake_quantize(xs[0], amax).shape == xs[0].shape  # broadcasts as a per-channel amax


def test_max_calibrator_returns_a_copy_and_resets():
    cal = MaxCalibrator(8)
    cal.collect(torch.tensor([1.0, -2.0]))
    amax = cal.compute_amax()
    amax += 10
    assert float(cal.compute_amax()) == 2.0
    cal.reset()
    assert cal.compute_amax() is None  # pytorch-quantization: None after reset


def test_max_calibrator_on_real_conv_weights_matches_per_channel_amax():
    model, _ = zoo.trained_model("resnet18", epochs=3, image_size=32, seed=0, progress=False)
    w = model.conv1.weight.detach()
    cal = MaxCalibrator(8, axis=0)
    cal.collect(w)
    assert torch.equal(cal.compute_amax(), w.abs().amax(dim=(1, 2, 3), keepdim=True))


# ----------------------------------------------------------------------------- histogram
def test_histogram_counts_everything_and_survives_growing_ranges():
    xs = batches(scales=(0.1, 1.0, 10.0, 0.01))
    cal = HistogramCalibrator(8, num_bins=256)
    widths = []
    for x in xs:
        cal.collect(x)
        widths.append(cal.bin_width)
    everything = torch.cat([x.flatten() for x in xs]).abs()
    assert int(cal.counts.sum()) == everything.numel()
    assert widths[0] < widths[1] < widths[2] == widths[3]  # widened twice, never narrowed
    assert cal.range_max >= float(everything.max()) > cal.range_max / 2  # power-of-two grid covering the max
    # each count is the number of values in its bin (exact: the width is a power of two)
    expected = torch.bincount((everything / cal.bin_width).floor().long().clamp_max(255), minlength=256)
    assert torch.equal(cal.counts.long(), expected)


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_histogram_amax_does_not_depend_on_batch_order(method):
    xs = batches(seed=3, scales=(0.2, 1.0, 5.0, 0.5))
    small_first, large_first = HistogramCalibrator(8), HistogramCalibrator(8)
    for x in xs:
        small_first.collect(x)
    for x in sorted(xs, key=lambda t: -float(t.abs().max())):
        large_first.collect(x)
    a, b = small_first.compute_amax(method), large_first.compute_amax(method)
    width = max(small_first.bin_width, large_first.bin_width)
    assert abs(float(a) - float(b)) <= width
    assert torch.equal(small_first.counts, large_first.counts)  # the same grid, so in fact the same histogram


@pytest.mark.parametrize("percentile", [50.0, 99.0, 99.9, 99.99, 100.0])
def test_percentile_agrees_with_torch_quantile_within_a_bin(percentile):
    torch.manual_seed(0)
    x = torch.cat([torch.randn(50_000), torch.randn(200) * 20])  # heavy tail
    cal = HistogramCalibrator(8)
    for chunk in x.split(10_000):
        cal.collect(chunk)
    amax = float(cal.compute_amax("percentile", percentile=percentile))
    w = cal.bin_width
    a, q = x.abs().double(), percentile / 100
    # torch interpolates between the two order statistics around the quantile; the histogram returns the upper
    # edge of the bin holding one of them, so it lies within a bin of the bracket (in a sparse tail the two
    # order statistics may be bins apart)
    lower, higher = (float(torch.quantile(a, q, interpolation=i)) for i in ("lower", "higher"))
    assert lower - w * 1e-9 <= amax <= higher + w * (1 + 1e-9)
    if percentile <= 99.0:  # where the data are dense, within one bin of torch's (linear) quantile itself
        reference = float(torch.quantile(a, q))
        assert reference <= amax + 1e-9 and amax - reference <= w * (1 + 1e-9)


@pytest.fixture(scope="module")
def relu_activations():
    """Post-ReLU activations of the digits-trained ResNet18 (layer1), 4 batches."""
    model, _ = zoo.trained_model("resnet18", epochs=3, image_size=32, seed=0, progress=False)
    images = data.digits_tensors()[2][:64]
    out = []
    hook = model.layer1.register_forward_hook(lambda m, i, o: out.append(o.detach().clone()))
    with torch.no_grad():
        for chunk in images.split(16):
            model(chunk)
    hook.remove()
    return out


def test_histogram_methods_on_real_activations_clip_less_than_max_and_reduce_mse(relu_activations):
    cal = HistogramCalibrator(8, unsigned=True)
    for a in relu_activations:
        cal.collect(a)
    everything = torch.cat([a.flatten() for a in relu_activations])
    max_amax = float(everything.max())
    results = {m: float(cal.compute_amax(m)) for m in ("percentile", "mse", "entropy")}
    results["percentile_99"] = float(cal.compute_amax("percentile", percentile=99.0))
    for method, amax in results.items():
        assert 0 < amax <= max_amax, method  # capped at the largest |x| seen
    assert results["percentile_99"] < max_amax
    mse = lambda amax: float(((fake_quantize(everything, amax, 8, unsigned=True) - everything) ** 2).mean())  # noqa: E731
    # mse's choice is (up to the bin-centre approximation) at least as good as max calibration; 4-bit shows it more
    assert mse(results["mse"]) <= mse(max_amax) * 1.05
    cal4 = HistogramCalibrator(4, unsigned=True)
    for a in relu_activations:
        cal4.collect(a)
    mse4 = lambda amax: float(((fake_quantize(everything, amax, 4, unsigned=True) - everything) ** 2).mean())  # noqa: E731
    assert mse4(float(cal4.compute_amax("mse"))) < mse4(max_amax)
    assert float(cal4.compute_amax("entropy")) < max_amax


def test_entropy_clips_a_long_tail():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(100_000), torch.tensor([40.0])])  # one outlier stretches max 10x
    cal = HistogramCalibrator(8)
    cal.collect(x)
    amax = float(cal.compute_amax("entropy"))
    assert 2.0 < amax < 10.0


def test_histogram_reset_and_bin_edges():
    cal = HistogramCalibrator(8, num_bins=64)
    cal.collect(torch.tensor([0.0, 1.0, 3.0]))
    edges = cal.bin_edges
    assert edges.shape == (65,) and float(edges[-1]) == cal.range_max
    cal.reset()
    assert cal.compute_amax("percentile") is None


def test_all_zero_first_batch_then_real_data():
    cal = HistogramCalibrator(8)
    cal.collect(torch.zeros(100))
    cal.collect(torch.linspace(-1, 1, 101))
    assert int(cal.counts.sum()) == 201 and cal.range_max >= 1.0
    assert float(cal.compute_amax("percentile", percentile=100.0)) >= 1.0


# ----------------------------------------------------------------------------- bad input
CALIBRATOR_BAD_INPUTS = {
    # name: (constructor, exception, message pattern)
    "max_bits": (lambda: MaxCalibrator(1), ValueError, r"num_bits must be an int in 2\.\.16, got 1"),
    "hist_bits": (lambda: HistogramCalibrator(17), ValueError, r"num_bits must be an int in 2\.\.16, got 17"),
    "hist_axis": (lambda: HistogramCalibrator(8, axis=0), ValueError, r"one amax per tensor; got axis=0"),
    "hist_bins": (lambda: HistogramCalibrator(8, num_bins=7), ValueError, r"num_bins must be an even int >= 16, got 7"),
    "max_axis_type": (lambda: MaxCalibrator(8, axis="0"), ValueError, r"axis must be None, an int or a non-empty tuple of ints"),
}


@pytest.mark.parametrize("case", list(CALIBRATOR_BAD_INPUTS))
def test_bad_calibrator_arguments(case):
    build, error, pattern = CALIBRATOR_BAD_INPUTS[case]
    with pytest.raises(error, match=pattern):
        build()


COLLECT_BAD_INPUTS = {
    # name: (calibrator, tensor, message pattern)
    "axis_out_of_range": (lambda: MaxCalibrator(8, axis=4), torch.ones(2, 3, 4, 5), r"axis 4 is out of range for a tensor with 4 dims"),
    "negative_axis_out_of_range": (lambda: MaxCalibrator(8, axis=-3), torch.ones(2, 3), r"axis -3 is out of range"),
    "bool_tensor": (lambda: MaxCalibrator(8), torch.ones(3, dtype=torch.bool), r"takes a real tensor"),
    "nan": (lambda: HistogramCalibrator(8), torch.tensor([1.0, float("nan")]), r"non-finite values"),
    "empty": (lambda: HistogramCalibrator(8), torch.ones(0), r"empty tensor"),
}


@pytest.mark.parametrize("case", list(COLLECT_BAD_INPUTS))
def test_bad_collect_input_is_rejected_and_nothing_is_collected(case):
    build, x, pattern = COLLECT_BAD_INPUTS[case]
    cal = build()
    with pytest.raises(ValueError, match=pattern):
        cal.collect(x)
    assert (cal.compute_amax() if isinstance(cal, MaxCalibrator) else cal.compute_amax("mse")) is None


def test_max_calibrator_rejects_a_changed_channel_count():
    cal = MaxCalibrator(8, axis=0)
    cal.collect(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"collected amax of shape \(4, 1\) before, but this batch gives \(5, 1\)"):
        cal.collect(torch.ones(5, 3))
    assert cal.compute_amax().shape == (4, 1)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [(dict(method="kl"), r"method must be one of \('percentile', 'mse', 'entropy'\), got 'kl'"),
     (dict(method="percentile", percentile=0.0), r"percentile must be in \(0, 100\], got 0\.0"),
     (dict(method="percentile", percentile=101), r"percentile must be in \(0, 100\]"),
     (dict(method="mse", stride=0), r"stride must be a positive int, got 0"),
     (dict(method="entropy", start_bin=5000), r"start_bin must be an int in 1\.\.num_bins=2048, got 5000")],
)
def test_histogram_compute_amax_bad_options(kwargs, pattern):
    cal = HistogramCalibrator(8)
    cal.collect(torch.randn(100))
    with pytest.raises(ValueError, match=pattern):
        cal.compute_amax(**kwargs)


def test_default_start_bin_scales_with_the_number_of_bins():
    """With 256 bins, the default first candidate is bin 16: mse can pick an amax well below half the range."""
    torch.manual_seed(0)
    x = torch.randn(20000)
    x[0] = 40.0  # one outlier stretches the range; at 4 bits the best amax clips it, far below half the range
    coarse = HistogramCalibrator(num_bits=4, num_bins=256)
    coarse.collect(x)
    amax = float(coarse.compute_amax("mse"))
    assert amax < 20.0, amax
    assert float(coarse.compute_amax("mse", start_bin=16)) == amax


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_a_value_exactly_at_the_range_edge_does_not_depend_on_batch_order(method):
    ones, big = torch.ones(1000), torch.tensor([1.5])
    forward, backward = HistogramCalibrator(8), HistogramCalibrator(8)
    for x in (ones, big):
        forward.collect(x)
    for x in (big, ones):
        backward.collect(x)
    assert torch.equal(forward.counts, backward.counts)
    kwargs = {"percentile": 99.9} if method == "percentile" else {}
    assert float(forward.compute_amax(method, **kwargs)) == float(backward.compute_amax(method, **kwargs))


# ----------------------------------------------------------------------------- pytorch-quantization's behaviour
def test_mse_chooses_the_least_error_bin_centre_uncapped():
    """692 x 512.0 and one 513.0, unsigned 8 bit, 2048 bins: the original gives 512.12 (the least error)."""
    cal = HistogramCalibrator(8, unsigned=True, num_bins=2048)
    cal.collect(torch.tensor([512.0] * 692 + [513.0]))
    w = cal.bin_width
    assert cal.counts[int(512.0 / w)] == 692  # a value on a bin edge counts in the bin it starts
    amax = float(cal.compute_amax("mse"))
    assert abs(amax - 512) < abs(amax - 513)
    assert (amax / w) % 1 == 0.5  # a bin centre


def test_unsigned_entropy_starts_at_start_bin_and_drops_the_outlier():
    """1000 values uniform on (0, 1) and one 10, unsigned 8 bit: the original gives amax < 1.1."""
    g = torch.Generator().manual_seed(0)
    cal = HistogramCalibrator(8, unsigned=True)
    cal.collect(torch.cat([torch.rand(1000, generator=g), torch.tensor([10.0])]))
    assert float(cal.compute_amax("entropy")) < 1.1


def test_calibrators_take_integer_tensors():
    x = torch.tensor([[0, -3, 2], [1, 5, -7]], dtype=torch.int32)
    cal = MaxCalibrator(8, axis=0)
    cal.collect(x)
    assert torch.equal(cal.compute_amax(), torch.tensor([[3.0], [7.0]]))
    hist = HistogramCalibrator(8)
    hist.collect(x.to(torch.int64))
    assert float(hist.compute_amax("percentile", percentile=100.0)) == 7.0


def test_max_calibrator_tracks_a_copy_of_each_batch_amax():
    cal = MaxCalibrator(8, axis=0, track_amax=True)
    for scale in (1.0, 3.0, 2.0):
        cal.collect(torch.full((2, 4), scale))
    assert [a.flatten().tolist() for a in cal.amaxs] == [[1.0, 1.0], [3.0, 3.0], [2.0, 2.0]]  # not the running max
    assert float(cal.compute_amax().max()) == 3.0
    cal.reset()
    assert cal.amaxs == [] and cal.compute_amax() is None
    untracked = MaxCalibrator(8)
    untracked.collect(torch.ones(3))
    assert untracked.amaxs == []


def test_histogram_skip_zeros():
    """The percentile 50 of 1..10 with five zeros skipped is about 5 (about 3 with them)."""
    x = torch.tensor([0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    skipping = HistogramCalibrator(8, None, False, skip_zeros=True)
    skipping.collect(x)
    assert float(skipping.compute_amax("percentile", percentile=50)) == pytest.approx(5.0, rel=5e-2)
    counting = HistogramCalibrator(8)
    counting.collect(x)
    assert float(counting.compute_amax("percentile", percentile=50)) == pytest.approx(3.0, rel=5e-2)
    skipping.collect(torch.zeros(4))  # nothing to count
    assert int(skipping.counts.sum()) == 10
