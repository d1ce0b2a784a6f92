"""fp8 on disk through a kvtier server: recompute vs L1 hit vs L2 hit (fs adapter, fp8 serde).

Starts ``kvtier server`` with an fs L2 adapter whose serde is fp8 (the default, scaled mode), runs SmolLM2 on a
long prompt through ``kvtier.Client``, runs the same request again (L1 hit), clears L1, and runs it once more so
the KV comes back through L2 prefetch and fp8 deserialize. Prints time-to-first-token for each and how the
output compares with the full recompute (max logits difference, greedy tokens).

    .venv/bin/python examples/serde/fp8/run.py [--tokens 2048] [--generate 32] [--l2-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path

import torch

import kvtier
from kvtier.integrations.demo import greedy_tokens
from kvtier.integrations.models import load_smollm2
from kvtier.integrations.transformers import TransformersKV
from kvtier.server.process import ServerProcess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens whose KV is reused")
    parser.add_argument("--generate", type=int, default=32, help="greedy tokens compared with recompute")
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
            kv = TransformersKV(model, client, "smollm2-135m-instruct")
            rows: list[tuple[str, int, float, torch.Tensor, list[int]]] = []

            def run(name: str) -> None:
                start = time.perf_counter()
                result = kv.forward(ids)
                ttft = time.perf_counter() - start
                # greedy continuation right away: it extends this output's cache
                tokens = greedy_tokens(model, result.output, args.generate)
                rows.append((name, result.reused_tokens, ttft, result.output.logits[0, -1], tokens))

            run("recompute")
            run("L1 hit")
            deadline = time.monotonic() + 60
            while client.stats()["store"]["l2_pending_bytes"] and time.monotonic() < deadline:
                time.sleep(0.05)  # write-through to the fs adapter is asynchronous
            client.clear_l1()
            run("L2 hit (fs, fp8)")
            _, _, recompute_s, ref_logits, ref_tokens = rows[0]
            print(f"\n{'run':<18} {'reused':>7} {'TTFT':>9} {'speedup':>8} {'max|dlogit|':>12} greedy={args.generate}")
            for name, reused, ttft, logits, tokens in rows:
                diff = float((logits - ref_logits).abs().max())
                same = "same" if tokens == ref_tokens else "DIFFERENT"
                print(f"{name:<18} {reused:>7} {ttft:>8.3f}s {recompute_s / ttft:>7.1f}x {diff:>12.4f} {same}")
            l2 = client.stats()["store"]["l2"][0]
            print(
                f"\nfs L2 holds {l2.get('used_bytes', 0) / 1e6:.1f} MB of fp8 records for {ids.shape[1]} tokens "
                f"(bf16 would be about {2 * ids.shape[1] * 30 * 192 * 2 / 1e6:.1f} MB)"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
