"""Shared pieces of ``kvtier bench``: timing against an in-run baseline, progress, and reporting.

A timing on a shared 2-core machine means little alone; every figure is printed beside a baseline measured in
the same run (a memcpy, a raw disk read, a plain torch cast) and the ratio between them. Measurements of the
subject and the baseline are interleaved round by round so that noise hits both alike; medians are reported.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

GB = 1e9


@dataclass
class Figure:
    """One measured figure: ``value`` in ``unit`` and, when it has one, its in-run baseline and the ratio."""

    name: str
    value: float
    unit: str = "GB/s"
    baseline: str | None = None
    baseline_value: float | None = None
    target: float | None = None  # minimum ratio to the baseline, when the issue sets one
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline_value in (None, 0.0):
            return None
        assert self.baseline_value is not None
        return self.value / self.baseline_value

    @property
    def meets_target(self) -> bool | None:
        ratio = self.ratio
        return None if self.target is None or ratio is None else ratio >= self.target


@dataclass
class Report:
    """A benchmark's output: its parameters and figures; printed as a table or one JSON document."""

    title: str
    params: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.title,
            "machine": machine_info(),
            "params": self.params,
            "figures": [{**asdict(f), "ratio": f.ratio, "meets_target": f.meets_target} for f in self.figures],
        }

    def print(self, as_json: bool) -> None:
        if as_json:
            print(json.dumps(self.to_json(), indent=2))
            return
        console = Console(width=max(Console().width, 150))
        table = Table(title=f"{self.title}  {json.dumps(self.params)}")
        for col in ("figure", "value", "baseline", "baseline value", "ratio", "target", "note"):
            table.add_column(col, justify="right" if col in ("value", "baseline value", "ratio") else "left")
        for f in self.figures:
            ratio = f.ratio
            verdict = ""
            if f.target is not None:
                verdict = f">= {f.target:g}x " + ("[green]met[/]" if f.meets_target else "[red]MISSED[/]")
            table.add_row(
                f.name,
                f"{f.value:.3f} {f.unit}",
                f.baseline or "",
                "" if f.baseline_value is None else f"{f.baseline_value:.3f} {f.unit}",
                "" if ratio is None else f"{ratio:.2f}x",
                verdict,
                f.note,
            )
        console.print(table)


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


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


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError as exc:
        raise SystemExit(f"--shape: expected comma-separated integers, got {text!r}") from exc
    if not shape or any(s <= 0 for s in shape):
        raise SystemExit(f"--shape: expected positive dimensions, got {text!r}")
    return shape
