"""The bench harness: operations and baselines sampled in alternation, the ratio of per-round medians with the
spread of the per-round ratios, the machine's load, the disturbed-baseline warning, the JSON document. Time is a
fake clock that each operation advances by the duration it is given: no timing assertion depends on the host."""

import json
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvtier.bench.common import (
    Harness,
    Op,
    Report,
    baseline_disturbance,
    load_between,
    machine_load,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def op(self, name: str, durations: Iterator[float]) -> Callable[[], None]:
        def go() -> None:
            self.calls.append(name)
            self.now += next(durations)

        return go


def steady(seconds: float) -> Iterator[float]:
    while True:
        yield seconds


def test_alternate_order_times_op_and_baseline_back_to_back() -> None:
    clock = FakeClock()
    h = Harness(4, clock=clock, reference_samples=0, warmup=False)
    h.compare("a vs b", Op("a", clock.op("a", steady(1.0)), 1e9), Op("b", clock.op("b", steady(2.0)), 1e9))
    (result,) = h.run(show_progress=False)
    assert clock.calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert result.orders == ["op", "baseline", "op", "baseline"]
    assert len(result.op_seconds) == len(result.baseline_seconds) == 4


def test_random_order_is_per_round_and_reproducible() -> None:
    def calls(seed: int) -> list[str]:
        clock = FakeClock()
        h = Harness(40, order="random", seed=seed, clock=clock, reference_samples=0, warmup=False)
        h.compare("a vs b", Op("a", clock.op("a", steady(1.0)), 1), Op("b", clock.op("b", steady(1.0)), 1))
        (result,) = h.run(show_progress=False)
        pairs = [clock.calls[i : i + 2] for i in range(0, len(clock.calls), 2)]
        assert all(sorted(p) == ["a", "b"] for p in pairs), "each round samples both, back to back"
        assert [("op" if p[0] == "a" else "baseline") for p in pairs] == result.orders
        return clock.calls

    first = calls(7)
    assert first == calls(7)
    assert first[::2].count("a") not in (0, 40), "both orders occur"


def test_warmup_and_reference_samples_are_not_in_the_figures() -> None:
    clock = FakeClock()
    h = Harness(3, clock=clock, reference_samples=2)
    # warm-up of a (10 s), then warm-up + 2 reference samples of b (1 s each); then the rounds (2 s / 1 s)
    h.compare("a", Op("a", clock.op("a", iter([10.0, 2.0, 2.0, 2.0])), 1e9), Op("b", clock.op("b", steady(1.0)), 1e9))
    (result,) = h.run(show_progress=False)
    assert result.op_seconds == [2.0, 2.0, 2.0]
    assert result.baseline_seconds == [1.0, 1.0, 1.0]
    assert result.reference == pytest.approx(1.0)
    assert clock.calls[:4] == ["a", "b", "b", "b"]


def test_ratio_of_per_round_medians_and_spread() -> None:
    clock = FakeClock()
    op_s = [1.0, 2.0, 4.0, 1.0, 2.0]
    base_s = [1.0, 1.0, 2.0, 2.0, 1.0]
    h = Harness(5, clock=clock, reference_samples=0, warmup=False)
    h.compare("x", Op("op", clock.op("op", iter(op_s)), 2e9), Op("base", clock.op("base", iter(base_s)), 1e9))
    (result,) = h.run(show_progress=False)
    op_rates = [2 / s for s in op_s]
    base_rates = [1 / s for s in base_s]
    assert result.op_value == pytest.approx(statistics.median(op_rates))
    assert result.baseline_value == pytest.approx(statistics.median(base_rates))
    assert result.ratio == pytest.approx(statistics.median(op_rates) / statistics.median(base_rates))
    per_round = [o / b for o, b in zip(op_rates, base_rates, strict=True)]
    assert result.round_ratios == pytest.approx(per_round)
    fig = result.figure()
    assert fig.ratio == pytest.approx(result.ratio)
    assert fig.spread == pytest.approx((min(per_round), max(per_round)))
    q = statistics.quantiles(per_round, n=4, method="inclusive")
    assert fig.iqr == pytest.approx((q[0], q[2]))
    assert fig.rounds == 5 and fig.baseline == "base" and fig.unit == "GB/s"


def test_a_shared_baseline_is_sampled_beside_each_operation() -> None:
    clock = FakeClock()
    base = Op("memcpy", clock.op("memcpy", steady(1.0)), 1)
    h = Harness(2, clock=clock, reference_samples=0, warmup=False)
    h.compare("a", Op("a", clock.op("a", steady(1.0)), 1), base)
    h.compare("b", Op("b", clock.op("b", steady(1.0)), 1), base)
    results = h.run(show_progress=False)
    assert clock.calls == ["a", "memcpy", "b", "memcpy", "memcpy", "a", "memcpy", "b"]
    assert [len(r.baseline_seconds) for r in results] == [2, 2]
    with pytest.raises(ValueError, match="twice"):
        h.compare("a", base, base)


def test_setup_runs_untimed_before_every_call() -> None:
    clock = FakeClock()
    setups: list[int] = []

    def setup() -> None:
        setups.append(1)
        clock.now += 100.0  # whatever the setup costs is not in the sample

    h = Harness(3, clock=clock, reference_samples=0, warmup=True)
    h.compare("s", Op("s", clock.op("s", steady(1.0)), 1, setup=setup), None)
    (result,) = h.run(show_progress=False)
    assert len(setups) == 4 and result.op_seconds == [1.0, 1.0, 1.0]
    assert result.baseline_value is None and result.figure().ratio is None and result.figure().spread is None


def test_a_slow_baseline_is_reported_as_disturbed() -> None:
    clock = FakeClock()
    # quiet at the start (warm-up and reference: 1 s), then three times slower in every round
    base_durations = iter([1.0, 1.0, 1.0] + [3.0] * 5)
    h = Harness(5, clock=clock, reference_samples=2)
    h.compare("op", Op("op", clock.op("op", steady(1.0)), 1e9), Op("memcpy", clock.op("memcpy", base_durations), 1e9))
    (result,) = h.run(show_progress=False)
    assert "memcpy" in result.warning and "measured at the start" in result.warning
    report = Report("t", {})
    report.add_results([result])
    assert report.warnings == [result.warning]


def test_a_baseline_with_a_wide_spread_is_reported_as_disturbed() -> None:
    clock = FakeClock()
    h = Harness(4, clock=clock, reference_samples=0, warmup=False)
    h.compare("op", Op("op", clock.op("op", steady(1.0)), 1), Op("b", clock.op("b", iter([1.0, 4.0, 1.0, 4.0])), 1))
    (result,) = h.run(show_progress=False)
    assert "spread" in result.warning


def test_a_quiet_baseline_gives_no_warning() -> None:
    clock = FakeClock()
    h = Harness(4, clock=clock, reference_samples=2)
    h.compare(
        "op", Op("op", clock.op("op", iter([5.0, 1.0, 9.0, 1.0, 9.0])), 1), Op("b", clock.op("b", steady(1.0)), 1)
    )
    (result,) = h.run(show_progress=False)
    assert result.warning == ""
    assert baseline_disturbance([1.0, 1.1, 0.95], 1.0, spread_limit=0.5, slow_limit=0.5) == ""
    assert baseline_disturbance([], None, spread_limit=0.5, slow_limit=0.5) == ""


def test_bad_harness_arguments() -> None:
    with pytest.raises(ValueError, match="rounds"):
        Harness(0)
    with pytest.raises(ValueError, match="order"):
        Harness(1, order="sideways")


def _proc(tmp_path: Path, steal: int, idle: int) -> Path:
    (tmp_path / "stat").write_text(
        f"cpu  100 0 50 {idle} 10 0 0 {steal} 0 0\ncpu0 1 2 3\nprocs_running 3\nprocs_blocked 0\n"
    )
    return tmp_path


def test_machine_load_and_the_share_stolen_between_two_snapshots(tmp_path: Path) -> None:
    before = machine_load(str(_proc(tmp_path, steal=0, idle=1000)))
    assert before["procs_running"] == 3 and before["cpus"] >= 1 and len(before["loadavg"]) == 3
    after = machine_load(str(_proc(tmp_path, steal=50, idle=1150)))
    after["jiffies"][0] += 300  # user time: 300 + 150 idle + 50 steal = 500 jiffies in all
    load = load_between(before, after)
    assert load["steal_pct"] == 10.0 and load["idle_pct"] == 30.0 and load["iowait_pct"] == 0.0
    assert load["procs_running_before"] == load["procs_running_after"] == 3
    missing = machine_load(str(tmp_path / "nowhere"))
    assert missing["procs_running"] is None and missing["jiffies"] is None
    assert load_between(missing, missing)["steal_pct"] is None


def test_report_json_shape_and_table_without_verdicts(capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    h = Harness(3, clock=clock, reference_samples=1)
    h.compare("store", Op("store", clock.op("s", steady(2.0)), 1e9), Op("write", clock.op("w", steady(1.0)), 1e9), "n")
    report = Report("demo", {"chunks": 1})
    report.load = load_between(machine_load(), machine_load())
    report.add_results(h.run(show_progress=False))
    doc = json.loads(json.dumps(report.to_json()))
    assert set(doc) == {"benchmark", "machine", "params", "load", "figures", "warnings"}
    (fig,) = doc["figures"]
    assert fig["name"] == "store" and fig["baseline"] == "write" and fig["note"] == "n"
    assert fig["value"] == pytest.approx(0.5) and fig["baseline_value"] == pytest.approx(1.0)
    assert fig["ratio"] == pytest.approx(0.5) and fig["spread"] == pytest.approx([0.5, 0.5])
    assert fig["iqr"] == pytest.approx([0.5, 0.5]) and fig["rounds"] == 3
    assert "target" not in fig and "meets_target" not in fig, "targets live in BENCHMARKS.md"
    assert {"steal_pct", "loadavg_before", "loadavg_after", "procs_running_before", "cpus"} <= set(doc["load"])
    report.warnings.append("baseline 'write' was disturbed: [x]")
    report.print(as_json=False)
    out = capsys.readouterr().out
    assert "0.50x" in out and "machine load:" in out and "disturbed: [x]" in out
    assert "met" not in out.split() and "MISSED" not in out
