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
    assert table.speedup("slow") == pytest.approx(1.0) and table.speedup("fast") == pytest.approx(2.0)
    assert sorted(fast.times_ms) == pytest.approx(sorted(costs["fast"]))
    clock2 = FakeClock()
    rebased = bench.compare_latency(workloads(clock2, costs, []), warmup=0, repeats=5, baseline="fast", clock=clock2)
    assert rebased.speedup("slow") == pytest.approx(0.5) and rebased.baseline == "fast"


def test_runs_under_inference_mode():
    seen = []
    bench.compare_latency({"f": lambda: seen.append(torch.is_inference_mode_enabled())}, warmup=1, repeats=2)
    assert seen == [True, True, True]


def test_table_text_dicts_and_plot():
    clock = FakeClock()
    table = bench.compare_latency(
        workloads(clock, {"unfused": [8.0], "fused": [4.0]}, []), warmup=1, repeats=3, clock=clock
    )
    text = str(table)
    assert text.splitlines()[0] == format_environment()
    assert "median ms" in text and "IQR ms" in text and "speedup" in text
    assert any(line.startswith("fused") and "4.000" in line and "2.00x" in line for line in text.splitlines())
    assert table.as_dicts() == [
        {"name": "unfused", "median_ms": pytest.approx(8.0), "iqr_ms": pytest.approx(0.0), "speedup": 1.0},
        {"name": "fused", "median_ms": pytest.approx(4.0), "iqr_ms": pytest.approx(0.0), "speedup": pytest.approx(2.0)},
    ]
    ax = table.plot()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["unfused", "fused"]
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["1.00x", "2.00x"]
    assert [round(p.get_height(), 6) for p in ax.patches] == [8.0, 4.0]
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"fns": {}}, ValueError, "at least one"),
        ({"fns": {"a": 3}}, TypeError, "'a'"),
        ({"fns": {"a": lambda: None}, "baseline": "b"}, ValueError, "'b'"),
        ({"fns": {"a": lambda: None}, "repeats": 0}, ValueError, "repeats"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        bench.compare_latency(**kwargs)
    with pytest.raises(KeyError, match="nope"):
        bench.compare_latency({"a": lambda: None}, warmup=0, repeats=1)["nope"]


def test_compare_models_latency_on_resnet18_restores_modes():
    from fusionlib.models import resnet18

    calls = []

    class Spy(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append((self.training, torch.is_inference_mode_enabled(), tuple(x.shape)))
            return self.inner(x)

    torch.manual_seed(0)
    model = Spy(resnet18()).train()
    model.inner.layer1.eval()
    other = Spy(nn.Flatten())
    table = bench.compare_models_latency(
        {"resnet18": model, "flatten": other}, torch.zeros(1, 3, 32, 32), warmup=1, repeats=2
    )
    assert [row.name for row in table.rows] == ["resnet18", "flatten"]
    assert calls == [(False, True, (1, 3, 32, 32))] * 6
    assert model.training and not model.inner.layer1.training and model.inner.layer2.training
    assert table.speedup("resnet18") == 1.0 and table.speedup("flatten") > 0
    with pytest.raises(TypeError, match="'f'"):
        bench.compare_models_latency({"f": lambda x: x}, torch.zeros(1))
