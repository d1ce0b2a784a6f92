"""Shared pieces of ``kvtier bench``: the interleaved harness, the machine's load, progress, and reporting.

A timing on a shared 2-core machine means little alone: another process that becomes runnable halves a memcpy.
So every figure is measured beside a baseline (a memcpy, a plain write of the same bytes, the serde alone), and
the two are sampled **in alternation, the same number of rounds** (:class:`Harness`): each round times the
operation and its baseline back to back, in an order that alternates (or is drawn at random) from round to
round, so that a disturbance hits both alike. A figure is reported as GB/s of each (the median over rounds) and
their ratio (the ratio of the two medians), with the spread of the per-round ratios (min-max and the
interquartile range): a narrow spread says the ratio held through the noise, a wide one says it did not.

The machine's load is recorded before and after the run (:func:`machine_load`: load average, runnable
processes, CPU count, and the share of CPU time stolen by the hypervisor from ``/proc/stat``), and the harness
warns when a baseline was itself disturbed: its per-round spread wider than ``spread_limit``, or its median far
below the best of a few samples taken before the measured rounds (the quiet reference).

User-facing output shows figures and ratios only. The project's targets and their met / MISSED verdicts live in
``BENCHMARKS.md``, beside the run that was judged, not in these tables.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

GB = 1e9
ORDERS = ("alternate", "random")


@dataclass
class Figure:
    """One measured figure: ``value`` in ``unit`` and, when it has one, its in-run baseline and the ratio.

    ``spread`` and ``iqr`` are the min-max and the 25th-75th percentiles of the per-round ratios, ``rounds``
    how many rounds sampled both (absent for a figure measured without a baseline)."""

    name: str
    value: float
    unit: str = "GB/s"
    baseline: str | None = None
    baseline_value: float | None = None
    note: str = ""
    spread: tuple[float, float] | None = None
    iqr: tuple[float, float] | None = None
    rounds: int | None = None

    @property
    def ratio(self) -> float | None:
        """``value / baseline_value``: for harness figures, the ratio of the two per-round medians."""
        if self.baseline_value is None or self.baseline_value == 0.0:
            return None
        return self.value / self.baseline_value


@dataclass
class Report:
    """A benchmark's output: its parameters, figures, machine load and warnings; printed as a table or as one
    JSON document."""

    title: str
    params: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    load: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def add_results(self, results: Sequence[PairResult]) -> None:
        """The figures of a harness run, and its disturbed-baseline warnings."""
        for r in results:
            self.add(r.figure())
            if r.warning and r.warning not in self.warnings:
                self.warnings.append(r.warning)

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.title,
            "machine": machine_info(),
            "params": self.params,
            "load": self.load,
            "figures": [{**asdict(f), "ratio": f.ratio} for f in self.figures],
            "warnings": self.warnings,
        }

    def print(self, as_json: bool) -> None:
        if as_json:
            print(json.dumps(self.to_json(), indent=2))
            return
        console = Console(width=max(Console().width, 150))
        table = Table(title=escape(f"{self.title}  {json.dumps(self.params)}"))
        for col in ("figure", "value", "baseline", "baseline value", "ratio", "ratio min-max (IQR)", "note"):
            table.add_column(col, justify="right" if col in ("value", "baseline value", "ratio") else "left")
        for f in self.figures:
            ratio = f.ratio
            spread = ""
            if f.spread is not None:
                spread = f"{f.spread[0]:.2f}-{f.spread[1]:.2f}x"
                if f.iqr is not None:
                    spread += f" ({f.iqr[0]:.2f}-{f.iqr[1]:.2f})"
            table.add_row(
                escape(f.name),
                f"{f.value:.3f} {f.unit}",
                escape(f.baseline or ""),
                "" if f.baseline_value is None else f"{f.baseline_value:.3f} {f.unit}",
                "" if ratio is None else f"{ratio:.2f}x",
                spread,
                escape(f.note),
            )
        console.print(table)
        if self.load:
            console.print(escape(describe_load(self.load)))
        for warning in self.warnings:
            console.print(f"[yellow]warning:[/] {escape(warning)}")


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


# -- machine load -----------------------------------------------------------------------------------------------
def _cpu_jiffies(stat: str) -> list[int] | None:
    """The aggregate ``cpu`` line of ``/proc/stat``: user nice system idle iowait irq softirq steal ..."""
    for line in stat.splitlines():
        if line.startswith("cpu "):
            return [int(v) for v in line.split()[1:]]
    return None


def machine_load(proc: str = "/proc") -> dict[str, Any]:
    """A snapshot of how busy the machine is: 1/5/15-minute load average, processes runnable now, CPU count, and
    the cumulative CPU jiffies (for the steal and idle shares between two snapshots). Fields a platform lacks
    (no ``/proc``) are ``None``."""
    snap: dict[str, Any] = {"time": time.time(), "cpus": os.cpu_count(), "loadavg": None, "procs_running": None}
    with suppress(OSError):
        snap["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    try:
        with open(os.path.join(proc, "stat")) as f:
            stat = f.read()
    except OSError:
        stat = ""
    for line in stat.splitlines():
        if line.startswith("procs_running "):
            snap["procs_running"] = int(line.split()[1])
    snap["jiffies"] = _cpu_jiffies(stat)
    return snap


def load_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The load over a run from two :func:`machine_load` snapshots: both snapshots' load average and runnable
    count, and the shares of all CPU time that was stolen by the hypervisor, idle, and waiting on I/O between
    them (``None`` without ``/proc/stat``)."""
    out: dict[str, Any] = {
        "cpus": before.get("cpus"),
        "seconds": round(after["time"] - before["time"], 1),
        "loadavg_before": before.get("loadavg"),
        "loadavg_after": after.get("loadavg"),
        "procs_running_before": before.get("procs_running"),
        "procs_running_after": after.get("procs_running"),
        "steal_pct": None,
        "idle_pct": None,
        "iowait_pct": None,
    }
    a, b = before.get("jiffies"), after.get("jiffies")
    if a and b and len(a) == len(b):
        # guest time is already counted in user/nice: the first 8 fields are the whole
        delta = [y - x for x, y in zip(a[:8], b[:8], strict=True)]
        total = sum(delta)
        if total > 0:
            for name, index in (("idle_pct", 3), ("iowait_pct", 4), ("steal_pct", 7)):
                if index < len(delta):
                    out[name] = round(100 * delta[index] / total, 1)
    return out


def describe_load(load: dict[str, Any]) -> str:
    """One line for humans: ``machine load: 2 CPUs, loadavg 1.2 -> 3.4, runnable 3 -> 2, steal 0.1 %, ...``."""
    parts = [f"{load.get('cpus')} CPUs"]
    before, after = load.get("loadavg_before"), load.get("loadavg_after")
    if before and after:
        parts.append(f"loadavg (1 min) {before[0]} -> {after[0]}")
    if load.get("procs_running_before") is not None:
        parts.append(f"runnable {load['procs_running_before']} -> {load['procs_running_after']}")
    for key, label in (("steal_pct", "steal"), ("idle_pct", "idle"), ("iowait_pct", "iowait")):
        if load.get(key) is not None:
            parts.append(f"{label} {load[key]} %")
    if load.get("seconds") is not None:
        parts.append(f"over {load['seconds']} s")
    return "machine load: " + ", ".join(parts)


@contextmanager
def recording_load(report: Report) -> Iterator[None]:
    """Record the machine's load before and after the block into ``report.load``."""
    before = machine_load()
    try:
        yield
    finally:
        report.load = load_between(before, machine_load())


# -- the harness ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    """One timed operation: ``fn`` moves ``amount`` units per call (bytes by default: GB/s). ``setup``, when
    given, runs untimed before every timed call (drop a page cache, clear L1, pick fresh keys)."""

    name: str
    fn: Callable[[], object]
    amount: float
    setup: Callable[[], object] | None = None
    unit: str = "GB/s"
    scale: float = GB  # amount per second / scale = the figure in ``unit``

    def rate(self, seconds: float) -> float:
        return self.amount / max(seconds, 1e-12) / self.scale


@dataclass
class PairResult:
    """The samples of one operation and its baseline over the same rounds (``seconds`` per call, in round
    order; ``orders[i]`` is which ran first in round ``i``: ``"op"`` or ``"baseline"``)."""

    label: str
    op: Op
    baseline: Op | None
    op_seconds: list[float]
    baseline_seconds: list[float]
    orders: list[str]
    note: str = ""
    reference: float | None = None  # the baseline's best rate before the measured rounds (its quiet reference)
    warning: str = ""

    @property
    def op_rates(self) -> list[float]:
        return [self.op.rate(s) for s in self.op_seconds]

    @property
    def baseline_rates(self) -> list[float]:
        return [] if self.baseline is None else [self.baseline.rate(s) for s in self.baseline_seconds]

    @property
    def op_value(self) -> float:
        """The median over rounds of the operation's rate."""
        return statistics.median(self.op_rates)

    @property
    def baseline_value(self) -> float | None:
        return statistics.median(self.baseline_rates) if self.baseline is not None else None

    @property
    def ratio(self) -> float | None:
        """The ratio of the per-round medians: median(op rate) / median(baseline rate)."""
        base = self.baseline_value
        return None if base is None or base == 0 else self.op_value / base

    @property
    def round_ratios(self) -> list[float]:
        """Each round's op rate over the same round's baseline rate (none without a baseline)."""
        if self.baseline is None:
            return []
        return [o / b if b else float("inf") for o, b in zip(self.op_rates, self.baseline_rates, strict=True)]

    def figure(self) -> Figure:
        ratios = self.round_ratios
        spread = iqr = None
        if ratios:
            spread = (min(ratios), max(ratios))
            iqr = quartiles(ratios)
        return Figure(
            self.label,
            self.op_value,
            self.op.unit,
            baseline=None if self.baseline is None else self.baseline.name,
            baseline_value=self.baseline_value,
            note=self.note,
            spread=spread,
            iqr=iqr,
            rounds=len(self.op_seconds),
        )


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """25th and 75th percentiles (linear interpolation; a single value is both)."""
    if len(values) < 2:
        return (values[0], values[0])
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[0], q[2])


def baseline_disturbance(
    rates: Sequence[float], reference: float | None, *, spread_limit: float, slow_limit: float
) -> str:
    """Why a baseline's samples cannot be trusted, or ``""``: their spread ((max - min) / median) wider than
    ``spread_limit``, or their median below ``slow_limit`` times the quiet ``reference`` rate."""
    if not rates:
        return ""
    med = statistics.median(rates)
    reasons = []
    if med > 0 and len(rates) > 1 and (max(rates) - min(rates)) / med > spread_limit:
        reasons.append(f"its rounds spread {min(rates):.3g}-{max(rates):.3g} around a median of {med:.3g}")
    if reference is not None and reference > 0 and med < slow_limit * reference:
        reasons.append(f"its median {med:.3g} is {med / reference:.2f}x of {reference:.3g} measured at the start")
    return "; ".join(reasons)


class Harness:
    """Operations sampled in alternation with their baselines, the same number of rounds.

    ``compare(label, op, baseline)`` registers a figure; ``run()`` warms every operation up (one untimed call,
    unless ``warmup=False``), takes ``reference_samples`` samples of each baseline as its quiet reference, then
    runs ``rounds`` rounds: in each, every registered pair times its operation and its baseline back to back,
    the operation first in even rounds and the baseline first in odd ones (``order="alternate"``) or in an order
    drawn per round from ``seed`` (``order="random"``). A baseline shared by several figures is sampled beside
    each of them, so every ratio compares neighbouring samples.
    """

    def __init__(
        self,
        rounds: int,
        *,
        order: str = "alternate",
        seed: int = 0,
        reference_samples: int = 2,
        spread_limit: float = 0.5,
        slow_limit: float = 0.5,
        warmup: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if rounds < 1:
            raise ValueError(f"rounds: expected an integer >= 1, got {rounds!r}")
        if order not in ORDERS:
            raise ValueError(f"order: expected one of {list(ORDERS)}, got {order!r}")
        self.rounds = rounds
        self.order = order
        self.reference_samples = reference_samples
        self.spread_limit = spread_limit
        self.slow_limit = slow_limit
        self.warmup = warmup
        self._rng = random.Random(seed)
        self._clock = clock
        self._pairs: list[tuple[str, Op, Op | None, str]] = []

    def compare(self, label: str, op: Op, baseline: Op | None, note: str = "") -> None:
        """Measure ``op`` beside ``baseline`` (or alone, when it is None) under the figure name ``label``."""
        if any(p[0] == label for p in self._pairs):
            raise ValueError(f"figure {label!r} registered twice")
        self._pairs.append((label, op, baseline, note))

    def _time(self, op: Op) -> float:
        if op.setup is not None:
            op.setup()
        start = self._clock()
        op.fn()
        return self._clock() - start

    def run(self, description: str = "bench", *, show_progress: bool = True) -> list[PairResult]:
        ops: dict[int, Op] = {}
        baselines: dict[int, Op] = {}
        for _, op, base, _ in self._pairs:
            ops.setdefault(id(op), op)
            if base is not None:
                ops.setdefault(id(base), base)
                baselines.setdefault(id(base), base)
        if self.warmup:  # kernels loaded or compiled, pages touched, pools started, scratch grown
            for op in ops.values():
                self._time(op)
        references = {
            key: max(base.rate(self._time(base)) for _ in range(self.reference_samples))
            for key, base in baselines.items()
            if self.reference_samples > 0
        }
        results = [
            PairResult(label, op, base, [], [], [], note, None if base is None else references.get(id(base)))
            for label, op, base, note in self._pairs
        ]
        with progress(self.rounds, description, enabled=show_progress) as advance:
            for i in range(self.rounds):
                for r in results:
                    if r.baseline is None:
                        r.op_seconds.append(self._time(r.op))
                        continue
                    op_first = i % 2 == 0 if self.order == "alternate" else self._rng.random() < 0.5
                    r.orders.append("op" if op_first else "baseline")
                    if op_first:
                        r.op_seconds.append(self._time(r.op))
                        r.baseline_seconds.append(self._time(r.baseline))
                    else:
                        r.baseline_seconds.append(self._time(r.baseline))
                        r.op_seconds.append(self._time(r.op))
                advance()
        for r in results:
            if r.baseline is not None:
                why = baseline_disturbance(
                    r.baseline_rates, r.reference, spread_limit=self.spread_limit, slow_limit=self.slow_limit
                )
                if why:
                    r.warning = f"baseline {r.baseline.name!r} (of {r.label!r}) was disturbed: {why}"
        return results


# -- small helpers ----------------------------------------------------------------------------------------------
def median_rate(samples: list[float], nbytes: int) -> float:
    """GB/s from per-round durations in seconds (median round)."""
    return nbytes / statistics.median(samples) / GB


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr; yields ``advance()``."""
    if not enabled:
        yield lambda: None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def add_harness_arguments(parser: Any, rounds: int) -> None:
    """``--rounds``, ``--order`` and ``--json``, shared by the benches that run on the harness."""
    parser.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default: {rounds})")
    parser.add_argument(
        "--order",
        choices=ORDERS,
        default="alternate",
        help="which of an operation and its baseline runs first in a round: alternate, or random (default: alternate)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError as exc:
        raise SystemExit(f"--shape: expected comma-separated integers, got {text!r}") from exc
    if not shape or any(s <= 0 for s in shape):
        raise SystemExit(f"--shape: expected positive dimensions, got {text!r}")
    return shape
