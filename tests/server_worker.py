"""A client process for the server tests: ``python tests/server_worker.py MODE ADDRESS ...``; prints one JSON line.

Modes:
* ``store ADDRESS MODEL N``: store N deterministic chunks of the prompt ``range(N * 16)`` (chunk size 16).
* ``mix ADDRESS FIRST COUNT SECONDS``: COUNT clients (threads, indices FIRST...) each run store / retrieve / lookup /
  retrieve_into for SECONDS on shared and own keys, checking every retrieved chunk byte for byte against the
  content its key determines; every fourth client sends data as frames instead of shared memory.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch

from kvtier import ObjectKey
from kvtier.client import Client

SHAPES = [(2, 2, 16, 32), (2, 3, 16, 64), (2, 1, 16, 8)]


def content(key: ObjectKey) -> torch.Tensor:
    """The tensor every test stores under ``key``: shape and values follow from the key alone."""
    seed = int(key.chunk_hash[:12], 16) + key.kv_rank
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[seed % len(SHAPES)]
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def store_mode(address: str, model: str, n: int) -> dict[str, object]:
    with Client(address, timeout_s=20) as client:
        keys = client.keys_for_tokens(model, list(range(n * client.chunk_size)))
        client.store(keys, [content(k) for k in keys])
        return {"stored": len(keys), "shm": client.shm_enabled}


def mix_mode(address: str, index: int, seconds: float, shm: bool) -> dict[str, object]:
    shared = [ObjectKey("test/mix", format(0xA000 + i, "x")) for i in range(24)]
    own = [ObjectKey("test/mix", format(0x100000 * (index + 1) + i, "x"), kv_rank=index % 3) for i in range(24)]
    counts = {"store": 0, "retrieve": 0, "retrieve_into": 0, "lookup": 0, "checked": 0, "mismatch": 0}
    with Client(address, timeout_s=20, shm=shm) as client:
        buffers = {shape: client.empty(shape, torch.bfloat16) for shape in SHAPES}
        deadline = time.monotonic() + seconds
        step = 0
        while time.monotonic() < deadline:
            pool = shared if step % 2 else own
            batch = [pool[(step * 7 + j) % len(pool)] for j in range(1 + step % 3)]
            op = step % 4
            if op == 0:
                client.store(batch, [content(k) for k in batch])
                counts["store"] += 1
            elif op == 1:
                got = client.retrieve(batch)
                for key, t in zip(batch, got, strict=True):
                    if t is not None:
                        counts["checked"] += 1
                        counts["mismatch"] += not same_bytes(t, content(key))
                counts["retrieve"] += 1
            elif op == 2:
                # One key into a shared-memory buffer (one copy), others into plain tensors (staging).
                outs = [buffers[tuple(content(batch[0]).shape)]] + [torch.empty_like(content(k)) for k in batch[1:]]
                hits = client.retrieve_into(batch, outs)
                for key, t in zip(batch[:hits], outs[:hits], strict=True):
                    counts["checked"] += 1
                    counts["mismatch"] += not same_bytes(t, content(key))
                counts["retrieve_into"] += 1
            else:
                n = client.lookup(batch)
                if not 0 <= n <= len(batch):
                    counts["mismatch"] += 1
                counts["lookup"] += 1
            step += 1
        counts["shm"] = int(client.shm_enabled)
    return counts


if __name__ == "__main__":
    mode, address = sys.argv[1], sys.argv[2]
    if mode == "store":
        result = store_mode(address, sys.argv[3], int(sys.argv[4]))
        print(json.dumps(result))
    else:
        first, count, seconds = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
        results: list[dict[str, object]] = []
        errors: list[BaseException] = []

        def one(index: int) -> None:
            try:
                results.append(mix_mode(address, index, seconds, shm=index % 4 != 3))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(first + i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for r in results:
            print(json.dumps(r))
