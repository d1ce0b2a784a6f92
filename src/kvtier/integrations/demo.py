"""``kvtier demo``: SmolLM2 reuses a long prompt's KV through an embedded Store (L1, then an fs L2 adapter).

The story: recompute (nothing stored), the same prompt again (L1 hit), L1 cleared and again (L2 hit, through fp8
when that serde is registered, else raw), and an L2 hit through raw beside it. For each it prints the
time-to-first-token (prefix lookup + rebuild + forward over the rest, up to the first token's logits) and how the
output compares with the full recompute: max abs difference of the logits and whether greedy generation of
``--generate`` tokens matches.

Each path is timed after its own warm-up: a first run of it, untimed (its time is shown apart: it pays for
kernels loaded, pages touched, the page cache filled), then the median of ``--repeat`` runs. A repeated
recompute uses a fresh ``cache_salt`` each time (so it misses again and does the same work); a repeated L2 hit
empties L1 before each run (untimed), so each one comes from L2.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import kvtier
from kvtier.integrations.models import default_cache_dir, load_smollm2
from kvtier.serde import registered_serdes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens whose KV is reused (default 2048)")
    parser.add_argument("--generate", type=int, default=32, help="greedy tokens compared with recompute (32)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per path after its warm-up (default 3)")
    parser.add_argument("--cache-dir", default=None, help="model and L2 directory (default: $KVTIER_CACHE_DIR "
                        "or ~/.cache/kvtier)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def greedy_tokens(model: Any, output: Any, steps: int) -> list[int]:
    """Greedy tokens continuing from a forward's output (its logits and cache)."""
    tokens = [int(output.logits[0, -1].argmax())]
    cache = output.past_key_values
    with torch.no_grad():
        for _ in range(steps - 1):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvtier.integrations.transformers import TransformersKV

    if args.tokens < 1 or args.generate < 1 or args.repeat < 1:
        raise kvtier.ConfigError("--tokens, --generate and --repeat: expected integers >= 1")
    console = Console(stderr=True)
    root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    with console.status("loading SmolLM2-135M-Instruct (the first run converts the GGUF once, about a minute)"):
        start = time.perf_counter()
        model, tokenizer = load_smollm2(root)
        load_s = time.perf_counter() - start
    import argparse as text_source  # a real text that ships with Python

    with open(text_source.__file__, encoding="utf-8") as f:
        ids = tokenizer(f.read(), return_tensors="pt").input_ids[:, : args.tokens + 1]
    # The last token is always computed (its logits are the first token's); the chunks before it are reused.
    chunk = 256
    serdes = [("fp8", {"type": "fp8"})] if "fp8" in registered_serdes() else []
    serdes.append(("raw", {"type": "raw"}))
    (root / "demo").mkdir(parents=True, exist_ok=True)
    l2_root = Path(tempfile.mkdtemp(prefix="l2-", dir=root / "demo"))  # fresh: the first run must recompute
    rows: list[dict[str, Any]] = []
    try:
        stores = [
            kvtier.Store(
                l1_size_gb=1,
                chunk_size=chunk,
                l2_adapters=[{"type": "fs", "base_path": str(l2_root / name), "serde": config}],
            )
            for name, config in serdes
        ]
        try:
            kvs = [TransformersKV(model, s, "smollm2-135m-instruct") for s in stores]
            # The recompute path's warm-up stores the prompt's chunks under its own keys (every hit below reuses
            # them); each timed recompute has a fresh cache_salt, so that it misses and recomputes again.
            recomputes = [kvs[0]] + [
                TransformersKV(model, stores[0], "smollm2-135m-instruct", cache_salt=f"demo-recompute-{i}")
                for i in range(1, args.repeat + 1)
            ]
            with console.status("running the story"):
                result, row = timed_path("recompute", lambda i: recomputes[i].forward(ids), args.repeat)
                ref_tokens = greedy_tokens(model, result.output, args.generate)
                ref_logits = result.output.logits[0, -1]
                rows.append(row)
                for other in kvs[1:]:  # the other L2 tiers get the same chunks, without a recompute
                    other.save(other.keys(ids), result.output.past_key_values)
                for s in stores:
                    s.flush()
                paths: list[tuple[str, TransformersKV, bool]] = [("L1 hit", kvs[0], False)]
                paths += [(f"L2 hit ({name})", kv, True) for (name, _), kv in zip(serdes, kvs, strict=True)]
                for name, kv, from_l2 in paths:
                    # an L2 path finds L1 empty in every run (emptied untimed before it): each is an L2 hit
                    store = stores[kvs.index(kv)]
                    prepare: Callable[[int], object] | None = None
                    if from_l2:
                        prepare = functools.partial(_clear_l1, store)
                    result, row = timed_path(name, functools.partial(_forward, kv, ids), args.repeat, prepare)
                    row["max_abs_logit_diff"] = float((result.output.logits[0, -1] - ref_logits).abs().max())
                    row["greedy_match"] = greedy_tokens(model, result.output, args.generate) == ref_tokens
                    rows.append(row)
        finally:
            for s in stores:
                s.close()
    finally:
        shutil.rmtree(l2_root, ignore_errors=True)
    recompute = rows[0]["ttft_s"]
    for row in rows:
        row["speedup"] = recompute / row["ttft_s"]
    return {
        "model": "SmolLM2-135M-Instruct (float32)",
        "model_load_s": load_s,
        "prompt_tokens": int(ids.shape[1]),
        "chunk_size": chunk,
        "greedy_tokens": args.generate,
        "repeat": args.repeat,
        "torch_threads": torch.get_num_threads(),
        "runs": rows,
    }


def _clear_l1(store: kvtier.Store, _: int) -> None:
    store.clear_l1()


def _forward(kv: Any, ids: torch.Tensor, _: int) -> Any:
    return kv.forward(ids)


def timed_path(
    name: str, run: Callable[[int], Any], repeat: int, prepare: Callable[[int], object] | None = None
) -> tuple[Any, dict[str, Any]]:
    """A path timed after its warm-up: ``run(0)`` untimed (its time is kept apart as ``first_run_s``), then
    ``run(1..repeat)``, whose median is ``ttft_s``. ``prepare(i)``, when given, runs untimed before ``run(i)``.
    Returns the last run's result and the row."""
    times: list[float] = []
    first = 0.0
    result: Any = None
    for i in range(repeat + 1):
        if prepare is not None:
            prepare(i)
        start = time.perf_counter()
        result = run(i)
        elapsed = time.perf_counter() - start
        if i == 0:
            first = elapsed
        else:
            times.append(elapsed)
    row = {
        "run": name,
        "ttft_s": statistics.median(times),
        "ttft_runs_s": times,
        "first_run_s": first,
        "reused_tokens": result.reused_tokens,
    }
    return result, row


def print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(
        title=f"{report['model']}: {report['prompt_tokens']}-token prompt (argparse.py), chunks of "
        f"{report['chunk_size']}, model loaded in {report['model_load_s']:.1f} s; TTFT: median of "
        f"{report['repeat']} runs after a first, untimed one"
    )
    columns = ("run", "reused tokens", "TTFT", "first run", "speedup", "max |logits diff|")
    for col in (*columns, f"{report['greedy_tokens']} greedy"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for row in report["runs"]:
        diff = row.get("max_abs_logit_diff")
        match = row.get("greedy_match")
        table.add_row(
            row["run"],
            str(row["reused_tokens"]),
            f"{row['ttft_s'] * 1000:.0f} ms",
            f"{row['first_run_s'] * 1000:.0f} ms",
            f"{row['speedup']:.1f}x",
            "reference" if diff is None else f"{diff:.3g}",
            "reference" if match is None else ("same" if match else "[red]differs[/]"),
        )
    Console().print(table)
