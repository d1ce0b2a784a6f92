"""``kvtier demo`` times each path after its warm-up: a first untimed run, then the median of ``--repeat``."""

import argparse
import json
from pathlib import Path

import pytest

from kvtier.integrations import demo


def test_timed_path_leaves_the_first_run_out_and_prepares_each_run_untimed() -> None:
    calls: list[str] = []

    class Result:
        def __init__(self, i: int) -> None:
            self.reused_tokens = i

    def run(i: int) -> Result:
        calls.append(f"run {i}")
        return Result(i)

    result, row = demo.timed_path("p", run, 3, lambda i: calls.append(f"prepare {i}"))
    assert calls == [x for i in range(4) for x in (f"prepare {i}", f"run {i}")]
    assert result.reused_tokens == 3 and row["reused_tokens"] == 3
    assert len(row["ttft_runs_s"]) == 3 and row["first_run_s"] >= 0
    assert row["ttft_s"] == sorted(row["ttft_runs_s"])[1]


def test_demo_reports_every_path_after_its_warm_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    args = argparse.Namespace(tokens=256, generate=2, repeat=1, cache_dir=None, json=True)
    report = demo.run(args)
    demo.print_report(report, as_json=True)
    doc = json.loads(capsys.readouterr().out)
    runs = {r["run"]: r for r in doc["runs"]}
    assert doc["repeat"] == 1 and {"recompute", "L1 hit", "L2 hit (raw)"} <= set(runs)
    assert runs["recompute"]["reused_tokens"] == 0, "each timed recompute misses (a fresh cache_salt)"
    for name, r in runs.items():
        assert len(r["ttft_runs_s"]) == 1 and r["first_run_s"] > 0
        if name != "recompute":
            assert r["reused_tokens"] == 256 and r["greedy_match"]
