"""Drive vLLM's multi-process engine with kvtier's connector on a ``kvtier server``: ``python mp_engine.py
ADDRESS STEPS_JSON`` prints one JSON line per step. A step is ``{"ids": [...], "salt": str | null}`` (generate 32
greedy tokens) or ``"clear_l1"`` (wait for the server's L2 writes, then drop its L1). Run as its own process:
vLLM reads ``VLLM_ENABLE_V1_MULTIPROCESSING`` once per process."""

from __future__ import annotations

import json
import sys
import time

from engine_helpers import close_llm, generate, make_llm

import kvtier


def main() -> None:
    address, steps = sys.argv[1], json.loads(sys.argv[2])
    llm = make_llm({"server": address}, kv_cache_memory_bytes=64 << 20)
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    with kvtier.Client(address) as client:
        for step in steps:
            if step == "clear_l1":
                deadline = time.monotonic() + 60
                while client.stats()["store"]["l2_pending_bytes"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                client.clear_l1()
                print(json.dumps({"cleared": True}), flush=True)
                continue
            before = client.stats()["store"]
            tokens, cached = generate(llm, step["ids"], cache_salt=step.get("salt"))
            after = client.stats()["store"]
            print(json.dumps({
                "tokens": tokens,
                "cached": cached,
                "l1_hits": after["l1"]["hits"] - before["l1"]["hits"],
                "l2_prefetched": after["l2_prefetched"] - before["l2_prefetched"],
                "stored": after["stored"] - before["stored"],
            }), flush=True)  # fmt: skip
    close_llm(llm)


if __name__ == "__main__":
    main()
