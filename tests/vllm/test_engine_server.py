"""The connector through a real ``kvtier server`` with vLLM's multi-process engine (scheduler and worker in other
processes than the test): L1 hit, L2 hit after the server's L1 is cleared, another salt a miss; 32 greedy tokens
identical to the first (miss) run. vLLM's count of prompt tokens it did not compute is checked in every hit, and
the server's own counters show the chunks were read from it (L1 hits, then L2 prefetches)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import CHUNK, prompt

from kvtier.server.process import ServerProcess

pytestmark = pytest.mark.timeout(600)
SCRIPT = Path(__file__).parent / "mp_engine.py"


def test_multiprocess_engine_through_a_kvtier_server(tmp_path: Path) -> None:
    l2 = {"type": "fs", "base_path": str(tmp_path / "l2")}
    server = ServerProcess(["--l1-size-gb", "0.25", "--chunk-size", str(CHUNK), "--l2-adapter", json.dumps(l2)])
    server.start()
    try:
        ids = prompt(3 * CHUNK + 21, seed=11)
        short = prompt(CHUNK // 2, seed=12)
        steps = [{"ids": ids}, {"ids": ids}, "clear_l1", {"ids": ids}, {"ids": ids, "salt": "other"}, {"ids": short}]
        run = subprocess.run(
            [sys.executable, str(SCRIPT), server.address, json.dumps(steps)],
            check=False, capture_output=True, text=True, timeout=540, cwd=SCRIPT.parent,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-4000:]
        miss, l1, cleared, l2, salted, tiny = [json.loads(line) for line in run.stdout.splitlines() if line[:1] == "{"]
    finally:
        server.stop()
    assert miss["cached"] == 0 and miss["stored"] == 3
    assert cleared == {"cleared": True}
    assert l1["cached"] == 3 * CHUNK and l1["l1_hits"] >= 3 and l1["tokens"] == miss["tokens"]
    assert l2["cached"] == 3 * CHUNK and l2["l2_prefetched"] == 3 and l2["tokens"] == miss["tokens"]
    assert salted["cached"] == 0 and salted["stored"] == 3 and salted["tokens"] == miss["tokens"]
    assert tiny["cached"] == 0 and tiny["stored"] == 0
