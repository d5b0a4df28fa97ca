"""fusionlib.bench: the measuring protocol, checked with fake callables and a fake clock (no timed asserts)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn

from fusionlib import bench
from fusionlib.env import format_environment



class FakeClock:
    """A clock that only moves when a fake workload says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def workloads(clock: FakeClock, costs_ms: dict[str, list[float]], log: list[str]):
    """Callables that log their name and advance the clock by their next cost (cycling)."""

    def make(name: str):
        count = {"n": 0}

        def fn():
            log.append(name)
            seq = costs_ms[name]
            clock.now += seq[count["n"] % len(seq)] / 1e3
            count["n"] += 1
            return torch.is_inference_mode_enabled()

        return fn

    return {name: make(name) for name in costs_ms}


def test_call_counts_and_balanced_order():
    clock, log = FakeClock(), []
    fns = workloads(clock, {"a": [1.0], "b": [1.0], "c": [1.0]}, log)
    bench.compare_latency(fns, warmup=2, repeats=4, clock=clock)
    assert len(log) == 3 * (2 + 4) and {n: log.count(n) for n in "abc"} == {"a": 6, "b": 6, "c": 6}
    rounds = [log[i : i + 3] for i in range(0, len(log), 3)]
    # Each round calls every callable once, in the order round_order gives.
    assert rounds[2:] == [bench.round_order(list("abc"), r) for r in range(4)]
    assert all(sorted(r) == list("abc") for r in rounds)


def test_round_order_is_a_latin_square_per_cycle_with_changing_neighbours():
    names = list("abcd")
    orders = [bench.round_order(names, r) for r in range(4 * 25)]
    assert orders == [bench.round_order(names, r) for r in range(4 * 25)]  # seeded: reproducible
    for cycle in range(25):
        block = orders[4 * cycle : 4 * cycle + 4]
        for position in range(4):
            assert sorted(order[position] for order in block) == names  # each name once per position
        assert block[1] == block[0][1:] + block[0][:1]  # rotation within the cycle
    predecessors = {n: {o[o.index(n) - 1] for o in orders if o.index(n) > 0} for n in names}
    assert all(len(p) == 3 for p in predecessors.values()), predecessors  # no fixed neighbour
    two = [bench.round_order(["x", "y"], r) for r in range(10)]
    assert all(two[i][0] != two[i + 1][0] for i in range(0, 10, 2))  # a pair alternates within each cycle


def test_medians_iqr_and_speedups_from_a_fake_clock():
    clock, log = FakeClock(), []
    costs = {"slow": [10.0, 10.0, 10.0, 30.0, 10.0], "fast": [4.0, 5.0, 6.0, 5.0, 100.0]}
    table = bench.compare_latency(workloads(clock, costs, log), warmup=0, repeats=5, clock=clock)
    slow, fast = table["slow"], table["fast"]
    assert slow.median_ms == pytest.approx(10.0) and fast.median_ms == pytest.approx(5.0)  # outliers ignored
    assert fast.iqr_ms == pytest.approx(6.0 - 5.0) and slow.iqr_ms == pytest.approx(0.0)
    # per-round ratios slow/fast: 2.5, 2, 1.667, 6, 0.1 -> median 2
    assert fast.ratios == pytest.approx((2.5, 2.0, 10 / 6, 6.0, 0.1))
    assert table.speedup("slow") == 1.0 and table.speedup("fast") == pytest.approx(2.0)
    assert sorted(fast.times_ms) == pytest.approx(sorted(costs["fast"]))
    clock2 = FakeClock()
    rebased = bench.compare_latency(workloads(clock2, costs, []), warmup=0, repeats=5, baseline="fast", clock=clock2)
    assert rebased.speedup("slow") == pytest.approx(0.5) and rebased.baseline == "fast"


def test_speedup_is_the_median_of_per_round_ratios_not_a_ratio_of_medians():
    """Load bursts (rounds 3-6) slow both members of a pair; pairing cancels them, medians do not."""
    clock = FakeClock()
    costs = {"base": [10.0, 10.0, 10.0, 30.0, 30.0, 30.0, 10.0], "cand": [5.0, 5.0, 20.0, 15.0, 15.0, 15.0, 5.0]}
    table = bench.compare_latency(workloads(clock, costs, []), warmup=0, repeats=7, clock=clock)
    assert table["base"].median_ms == pytest.approx(10.0) and table["cand"].median_ms == pytest.approx(15.0)
    assert table.speedup("cand") == pytest.approx(2.0)  # a ratio of medians would say 0.67
    assert table["cand"].speedup_lo == pytest.approx(0.5) and table["cand"].speedup_hi == pytest.approx(2.0)


RATIOS = [1.3, 1.9, 1.1, 1.6, 2.0, 1.2, 1.5, 1.8, 1.4, 1.7]  # baseline 10 ms / candidate, one per round


def _ratio_table(ratios, base_ms=10.0):
    clock = FakeClock()
    costs = {"base": [base_ms] * len(ratios), "cand": [base_ms / r for r in ratios]}
    return bench.compare_latency(workloads(clock, costs, []), warmup=0, repeats=len(ratios), clock=clock)


def test_interval_is_the_sign_test_interval_of_the_per_round_ratios():
    table = _ratio_table(RATIOS)
    # 10 rounds: k = 2, the 2nd smallest and the 2nd largest ratio; coverage 1 - 2 * 11/1024
    speedup = table.interval("cand")
    assert speedup.ratio == pytest.approx(1.55) and float(speedup) == pytest.approx(1.55)
    assert (speedup.lo, speedup.hi) == (pytest.approx(1.2), pytest.approx(1.9))
    assert speedup.confidence == pytest.approx(1 - 2 * 11 / 1024) and speedup.rounds == 10
    row = table["cand"]
    assert (row.speedup, row.speedup_lo, row.speedup_hi) == (speedup.ratio, speedup.lo, speedup.hi)
    assert table.interval("base") == bench.Speedup(1.0, 1.0, 1.0, speedup.confidence, 10)
    assert speedup.describe() == "1.55x faster (95% interval 1.20-1.90)" and speedup.measurable
    assert table.describe("cand") == "cand vs base: 1.55x faster (95% interval 1.20-1.90)"


@pytest.mark.parametrize("n, k", [(6, 1), (9, 2), (10, 2), (15, 4), (20, 6), (25, 8), (100, 40)])
def test_sign_test_interval_matches_the_binomial_table(n, k):
    lo, hi, coverage = bench.sign_test_interval(list(range(1, n + 1)))
    assert (lo, hi) == (k, n + 1 - k)
    assert coverage >= 0.95
    below = sum(__import__("math").comb(n, i) for i in range(k + 1)) / 2**n
    assert 1 - 2 * below < 0.95  # k + 1 would fall short of 95%


def test_describe_says_slower_no_difference_or_too_few_rounds():
    slower = _ratio_table([1 / r for r in RATIOS]).interval("cand")  # 1.1x .. 2x slower
    assert slower.ratio < 1 and slower.describe() == "1.55x slower (95% interval 1.20-1.90)"
    even = _ratio_table([0.97, 1.02, 0.99, 1.03, 1.0, 0.98, 1.01, 1.04, 0.96, 1.0]).interval("cand")
    assert even.describe() == "no measurable difference (1.00x, 95% interval 0.97-1.03)" and not even.measurable
    few = _ratio_table([2.0, 2.1, 1.9]).interval("cand")
    assert few.rounds == 3 and not few.measurable and few.confidence == pytest.approx(0.75)
    assert few.describe().startswith("2.00x (only 3 round(s): too few for a 95% interval")
    assert "range 1.90-2.10" in few.describe()


def test_runs_under_inference_mode():
    seen = []
    bench.compare_latency({"f": lambda: seen.append(torch.is_inference_mode_enabled())}, warmup=1, repeats=2)
    assert seen == [True, True, True]


def test_table_text_dicts_and_plot():
    clock = FakeClock()
    table = bench.compare_latency(
        workloads(clock, {"unfused": [8.0, 8.0, 8.0], "fused": [4.0, 3.2, 5.0]}, []), warmup=1, repeats=6, clock=clock
    )
    text = str(table)
    lines = text.splitlines()
    assert lines[0] == format_environment() and "threads=1" in lines[0]
    assert "6 paired rounds" in lines[1] and "on 1 thread(s)" in lines[1]
    assert "median ms" in text and "IQR ms" in text and "speed-up" in text and "95% interval" in text
    # fused times by round: 4, 3.2, 5, 4, 3.2, 5 -> ratios 2, 2.5, 1.6, ... -> median 2, interval [1.6, 2.5]
    assert any(line.startswith("fused") and "4.000" in line and "2.00x" in line and "1.60-2.50" in line
               for line in lines)
    assert any(line.startswith("unfused") and "1.00x" in line and "(baseline)" in line for line in lines)
    assert table.as_dicts() == [
        {"name": "unfused", "median_ms": pytest.approx(8.0), "iqr_ms": pytest.approx(0.0), "speedup": 1.0,
         "speedup_lo": 1.0, "speedup_hi": 1.0},
        {"name": "fused", "median_ms": pytest.approx(4.0), "iqr_ms": pytest.approx(1.35), "speedup": pytest.approx(2.0),
         "speedup_lo": pytest.approx(1.6), "speedup_hi": pytest.approx(2.5)},
    ]
    ax = table.plot()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["unfused", "fused"]
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["1.00x", "2.00x\n1.60-2.50"]
    assert [round(p.get_height(), 6) for p in ax.patches] == [8.0, 4.0]
    import matplotlib.pyplot as plt

    plt.close("all")


def test_measures_on_one_thread_by_default_and_restores_the_count():
    seen = []
    torch.set_num_threads(2)  # conftest restores the session's count afterwards
    table = bench.compare_latency({"f": lambda: seen.append(torch.get_num_threads())}, warmup=1, repeats=2)
    assert seen == [1, 1, 1] and torch.get_num_threads() == 2
    assert table.num_threads == 1 and "threads=1" in table.environment
    seen.clear()
    kept = bench.compare_latency({"f": lambda: seen.append(torch.get_num_threads())}, warmup=0, repeats=1,
                                 num_threads=None)
    assert seen == [2] and kept.num_threads == 2 and "threads=2" in kept.environment
    with pytest.raises(RuntimeError, match="boom"):
        bench.compare_latency({"f": lambda: (_ for _ in ()).throw(RuntimeError("boom"))}, num_threads=1)
    assert torch.get_num_threads() == 2  # restored after a failing callable too
    with bench.num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="num_threads"):
        bench.compare_latency({"f": lambda: None}, num_threads=0)


def test_synchronize_brackets_every_timed_call_inside_the_clock():
    """A GPU sync waits for queued kernels: the wait before the clock stops must be timed."""
    clock, log = FakeClock(), []
    fns = workloads(clock, {"a": [2.0], "b": [1.0]}, log)

    def synchronize():
        log.append("sync")
        clock.now += 0.5 / 1e3  # the queued work of the call just made

    table = bench.compare_latency(fns, warmup=1, repeats=2, clock=clock, synchronize=synchronize)
    timed = log[log.index("sync"):]
    assert log[: log.index("sync")] == bench.round_order(["a", "b"], 0)  # warm-up, then one sync
    calls = [bench.round_order(["a", "b"], r) for r in range(2)]
    assert timed == ["sync"] + [x for order in calls for name in order for x in ("sync", name, "sync")]
    assert table["a"].median_ms == pytest.approx(2.5) and table["b"].median_ms == pytest.approx(1.5)
    assert table.speedup("b") == pytest.approx(2.5 / 1.5)
    with pytest.raises(TypeError, match="synchronize"):
        bench.compare_latency({"f": lambda: None}, synchronize=True)


def test_compare_models_latency_synchronizes_when_a_model_is_on_cuda(monkeypatch):
    model, x = nn.Linear(2, 2), torch.zeros(1, 2)
    assert bench._cuda_devices({"m": model}, (x, {"k": [x]})) == []
    synced = []
    monkeypatch.setattr(bench, "_cuda_devices", lambda models, args: [0, 1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    bench.compare_models_latency({"m": model}, x, warmup=0, repeats=2)
    assert synced == [0, 1] * 5  # after the warm-up, then before and after each timed call; both devices
    synced.clear()
    bench.compare_models_latency({"m": model}, x, warmup=0, repeats=2, synchronize=False)
    assert synced == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compare_models_latency_on_a_cuda_model():
    model, x = nn.Conv2d(3, 8, 3).cuda(), torch.randn(2, 3, 32, 32, device="cuda")
    assert bench._cuda_devices({"m": model}, (x,)) == [torch.cuda.current_device()]
    table = bench.compare_models_latency({"a": model, "b": nn.Sequential(model)}, x, warmup=1, repeats=6)
    assert all(row.median_ms > 0 for row in table.rows)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"fns": {}}, ValueError, "at least one"),
        ({"fns": {"a": 3}}, TypeError, "'a'"),
        ({"fns": {"a": lambda: None}, "baseline": "b"}, ValueError, "'b'"),
        ({"fns": {"a": lambda: None}, "repeats": 0}, ValueError, "repeats"),
        ({"fns": {"a": lambda: None}, "repeats": True}, ValueError, "repeats must be a positive int, got True"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        bench.compare_latency(**kwargs)
    with pytest.raises(KeyError, match="nope"):
        bench.compare_latency({"a": lambda: None}, warmup=0, repeats=1)["nope"]


def test_compare_models_latency_on_resnet18_restores_modes():
    from torchvision.models import resnet18

    calls = []
    clock = FakeClock()

    class Spy(nn.Module):
        def __init__(self, inner: nn.Module, cost_ms: float) -> None:
            super().__init__()
            self.inner, self.cost_ms = inner, cost_ms

        def forward(self, x):
            calls.append((self.training, torch.is_inference_mode_enabled(), tuple(x.shape)))
            clock.now += self.cost_ms / 1e3
            return self.inner(x)

    torch.manual_seed(0)
    model = Spy(resnet18(num_classes=10), 6.0).train()
    model.inner.layer1.eval()
    other = Spy(nn.Flatten(), 1.5)
    table = bench.compare_models_latency(
        {"resnet18": model, "flatten": other}, torch.zeros(1, 3, 32, 32), warmup=1, repeats=2, clock=clock
    )
    assert [row.name for row in table.rows] == ["resnet18", "flatten"]
    assert calls == [(False, True, (1, 3, 32, 32))] * 6
    assert model.training and not model.inner.layer1.training and model.inner.layer2.training
    assert table.speedup("resnet18") == 1.0 and table.speedup("flatten") == pytest.approx(4.0)
    assert table["flatten"].median_ms == pytest.approx(1.5) and table.num_threads == 1
    with pytest.raises(TypeError, match="'f'"):
        bench.compare_models_latency({"f": lambda x: x}, torch.zeros(1))
