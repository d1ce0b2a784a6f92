"""``kvtier bench workload``: the trace generator (deterministic, Zipf-shaped) and a tiny end-to-end run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.bench.workload import (
    TraceParams,
    generate_trace,
    trace_summary,
    zipf_probabilities,
    zipf_sample,
)
from kvtier.cli import main as cli_main


def test_trace_is_deterministic_with_a_seed() -> None:
    params = TraceParams(seed=7, requests=200, documents=20)
    a, b = generate_trace(params), generate_trace(params)
    assert [(r.tenant, r.kind, r.doc) for r in a] == [(r.tenant, r.kind, r.doc) for r in b]
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b, strict=True))
    c = generate_trace(TraceParams(seed=8, requests=200, documents=20))
    assert any(not np.array_equal(x.tokens, y.tokens) for x, y in zip(a, c, strict=True))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    requests=st.integers(1, 60),
    tenants=st.integers(1, 5),
    documents=st.integers(1, 8),
    shares=st.tuples(st.floats(0, 1), st.floats(0, 1)).filter(lambda t: t[0] + t[1] <= 1),
    zipf=st.floats(0, 3),
)
def test_any_parameters_give_a_consistent_deterministic_trace(
    *, seed: int, requests: int, tenants: int, documents: int, shares: tuple[float, float], zipf: float
) -> None:
    params = TraceParams(
        seed=seed,
        requests=requests,
        tenants=tenants,
        documents=documents,
        zipf=zipf,
        rag_share=shares[0],
        one_shot_share=shares[1],
        chunk_tokens=4,
    )
    trace = generate_trace(params)
    assert len(trace) == requests
    lengths = {
        "rag": params.system_chunks + params.doc_chunks + params.query_chunks,
        "chat": params.system_chunks + params.query_chunks,
        "one_shot": params.one_shot_chunks,
    }
    for r in trace:
        assert 0 <= r.tenant < tenants and len(r.tokens) == lengths[r.kind] * 4
        assert (0 <= r.doc < documents) if r.kind == "rag" else r.doc == -1
    again = generate_trace(params)
    assert all(np.array_equal(a.tokens, b.tokens) and a.kind == b.kind for a, b in zip(trace, again, strict=True))


def test_trace_structure() -> None:
    params = TraceParams(requests=600, tenants=3, documents=30, rag_share=0.5, one_shot_share=0.3)
    trace = generate_trace(params)
    kinds = Counter(r.kind for r in trace)
    assert abs(kinds["rag"] / 600 - 0.5) < 0.08 and abs(kinds["one_shot"] / 600 - 0.3) < 0.08
    ct = params.chunk_tokens
    for r in trace:
        assert len(r.tokens) % ct == 0
        if r.kind == "one_shot":
            assert len(r.tokens) == params.one_shot_chunks * ct and r.doc == -1
        elif r.kind == "rag":
            assert len(r.tokens) == (params.system_chunks + params.doc_chunks + params.query_chunks) * ct
    # The same document of the same tenant is the same tokens wherever it appears; one-shot prompts never repeat.
    docs: dict[tuple[int, int], bytes] = {}
    s, d = params.system_chunks * ct, params.doc_chunks * ct
    for r in trace:
        if r.kind == "rag":
            body = r.tokens[s : s + d].tobytes()
            assert docs.setdefault((r.tenant, r.doc), body) == body
    one_shots = [r.tokens.tobytes() for r in trace if r.kind == "one_shot"]
    assert len(set(one_shots)) == len(one_shots)
    summary = trace_summary(trace, ct)
    assert summary["requests"] == 600 and sum(summary["by_kind"].values()) == 600
    assert summary["distinct_chunks"] < summary["chunks_requested"]


@pytest.mark.parametrize("s", [0.0, 0.8, 1.2])
def test_zipf_sample_has_the_zipf_shape(s: float) -> None:
    """Counts of each rank against the expected ones: a chi-square statistic within its bulk (df = n - 1, so a
    mean of n - 1 and a standard deviation of sqrt(2 (n - 1))), and the log-log slope of the top ranks is -s."""
    n, size = 50, 40_000
    counts = np.bincount(zipf_sample(np.random.default_rng(3), n, s, size), minlength=n)
    expected = zipf_probabilities(n, s) * size
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < (n - 1) + 5 * np.sqrt(2 * (n - 1)), chi2
    top = np.arange(1, 11)
    slope = np.polyfit(np.log(top), np.log(counts[:10]), 1)[0]
    assert abs(slope + s) < 0.15, slope
    # ... and the documents of a generated trace follow the same law.
    trace = generate_trace(
        TraceParams(seed=1, requests=6000, tenants=1, documents=n, zipf=s, rag_share=1.0, one_shot_share=0.0)
    )
    doc_counts = np.bincount([r.doc for r in trace], minlength=n)
    expected = zipf_probabilities(n, s) * len(trace)
    chi2 = float(((doc_counts - expected) ** 2 / expected).sum())
    assert chi2 < (n - 1) + 5 * np.sqrt(2 * (n - 1)), chi2


def test_zipf_probabilities() -> None:
    p = zipf_probabilities(4, 1.0)
    assert p.sum() == pytest.approx(1.0)
    assert p[0] / p[1] == pytest.approx(2.0) and p[0] / p[3] == pytest.approx(4.0)
    assert zipf_probabilities(5, 0.0) == pytest.approx(np.full(5, 0.2))


def test_tiny_end_to_end_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "workload.png"
    argv = [
        "bench",
        "workload",
        "--requests",
        "80",
        "--documents",
        "10",
        "--l1-fractions",
        "0.1,0.3",
        "--policies",
        "LRU,S3-FIFO",
        "--json",
        "--no-progress",
        "--plot",
        str(png),
        "--dir",
        str(tmp_path),
    ]
    assert cli_main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    runs = doc["runs"]
    assert len(runs) == 2 * 2 * 2
    assert {(r["policy"], r["admission"]) for r in runs} == {
        (p, a) for p in ("LRU", "S3-FIFO") for a in ("always", "second_hit")
    }
    for r in runs:
        assert r["mismatches"] == 0 and r["l2_writes_dropped"] == 0
        assert r["chunks"] == doc["trace"]["chunks_requested"]
        assert r["l1_hits"] + r["l2_hits"] + r["misses"] == r["chunks"]
        assert 0 <= r["hit_rate"] <= 1
        assert set(r["tenants"]) == set(doc["trace"]["by_tenant"])
        assert sum(t["chunks"] for t in r["tenants"].values()) == r["chunks"]
    by = {(r["policy"], r["admission"], r["l1_fraction"]): r for r in runs}
    for (policy, admission, fraction), r in by.items():
        if admission == "second_hit":
            always = by[(policy, "always", fraction)]
            # One-shot chunks are never written under second_hit: far fewer L2 bytes than write-through.
            assert r["l2_bytes_written"] < always["l2_bytes_written"]
            assert r["admission_skipped"] > 0 and always["admission_skipped"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["plot"] == str(png)
    assert not list(tmp_path.glob("kvtier-workload-*")), "each run's fs tier is removed"


def test_missing_matplotlib_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    argv = ["bench", "workload", "--requests", "5", "--no-progress", "--plot", str(tmp_path / "x.png")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'kvtier[bench]'" in err and "--no-plot" in err
    assert not (tmp_path / "x.png").exists()
