"""fp8 on disk through a kvtier server: recompute vs L1 hit vs L2 hit (fs adapter, fp8 serde).

Starts ``kvtier server`` with an fs L2 adapter whose serde is fp8 (the default, scaled mode), runs SmolLM2 on a
long prompt through ``kvtier.Client``, runs the same request again (L1 hit), clears L1, and runs it once more so
the KV comes back through L2 prefetch and fp8 deserialize. Prints time-to-first-token for each and how the
output compares with the full recompute (max logits difference, greedy tokens).

Each path is timed after its warm-up: a first run, untimed (shown apart), then the median of ``--repeat`` runs;
a repeated recompute uses a fresh ``cache_salt`` (it misses again), a repeated L2 hit clears L1 first (untimed).

    .venv/bin/python examples/serde/fp8/run.py [--tokens 2048] [--generate 32] [--repeat 3] [--l2-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import kvtier
from kvtier.integrations.demo import greedy_tokens, timed_path
from kvtier.integrations.models import load_smollm2
from kvtier.integrations.transformers import TransformersKV
from kvtier.server.process import ServerProcess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens whose KV is reused")
    parser.add_argument("--generate", type=int, default=32, help="greedy tokens compared with recompute")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per path after its warm-up")
    parser.add_argument("--l2-dir", default=None, help="fs L2 directory (default: a fresh temporary one)")
    args = parser.parse_args()

    l2_dir = Path(args.l2_dir or tempfile.mkdtemp(prefix="kvtier-fp8-l2-"))
    adapter = {"type": "fs", "base_path": str(l2_dir), "serde": {"type": "fp8", "fp8_dtype": "float8_e4m3fn"}}
    server = ServerProcess(["--l1-size-gb", "1", "--eviction-policy", "LRU", "--l2-adapter", json.dumps(adapter)])
    print("$ kvtier server", shlex.join(server.args))
    server.start()
    try:
        model, tokenizer = load_smollm2()
        import argparse as text_source  # a real text that ships with Python

        text = Path(text_source.__file__).read_text(encoding="utf-8")
        ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens + 1]
        with kvtier.Client(server.address) as client:
            name = "smollm2-135m-instruct"
            kv = TransformersKV(model, client, name)
            # the warm-up recompute stores the prompt's chunks; each timed one misses again under a fresh salt
            recomputes = [kv] + [
                TransformersKV(model, client, name, cache_salt=f"fp8-example-{i}") for i in range(1, args.repeat + 1)
            ]
            rows: list[tuple[str, int, float, float, torch.Tensor, list[int]]] = []

            def wait_for_l2() -> None:
                deadline = time.monotonic() + 60
                while client.stats()["store"]["l2_pending_bytes"] and time.monotonic() < deadline:
                    time.sleep(0.05)  # write-through to the fs adapter is asynchronous

            def clear_l1(_: int) -> None:
                wait_for_l2()
                client.clear_l1()

            def path(label: str, run: Callable[[int], Any], prepare: Callable[[int], object] | None = None) -> None:
                result, row = timed_path(label, run, args.repeat, prepare)
                # greedy continuation right away: it extends this output's cache
                tokens = greedy_tokens(model, result.output, args.generate)
                rows.append((label, result.reused_tokens, row["ttft_s"], row["first_run_s"],
                             result.output.logits[0, -1], tokens))  # fmt: skip

            path("recompute", lambda i: recomputes[i].forward(ids))
            path("L1 hit", lambda _: kv.forward(ids))
            path("L2 hit (fs, fp8)", lambda _: kv.forward(ids), clear_l1)
            _, _, recompute_s, _, ref_logits, ref_tokens = rows[0]
            print(f"\nTTFT: median of {args.repeat} runs after a first, untimed one")
            print(
                f"{'run':<18} {'reused':>7} {'TTFT':>9} {'first run':>10} {'speedup':>8} {'max|dlogit|':>12} "
                f"greedy={args.generate}"
            )
            for label, reused, ttft, first, logits, tokens in rows:
                diff = float((logits - ref_logits).abs().max())
                same = "same" if tokens == ref_tokens else "DIFFERENT"
                print(
                    f"{label:<18} {reused:>7} {ttft:>8.3f}s {first:>9.3f}s {recompute_s / ttft:>7.1f}x {diff:>12.4f} "
                    f"{same}"
                )
            l2 = client.stats()["store"]["l2"][0]
            prompts = 1 + args.repeat  # each timed recompute stored the prompt once more, under its own salt
            print(
                f"\nfs L2 holds {l2.get('used_bytes', 0) / 1e6:.1f} MB of fp8 records for {prompts} copies of the "
                f"{ids.shape[1]}-token prompt (bf16 would be about {2 * ids.shape[1] * 30 * 192 * 2 / 1e6:.1f} MB "
                "per copy)"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
