"""The reference's command line, ``kvtier server --l1-size-gb 100 ...``, starts on a small host and serves
store and retrieve, its RSS following the bytes in use rather than the configured size; ``--l1-backing``."""

import json
import time
from pathlib import Path

import pytest
import torch

from kvtier import ConfigError, ObjectKey
from kvtier.client import Client
from kvtier.server.config import L1_BACKINGS, ServerConfig
from kvtier.server.process import ServerProcess
from kvtier.storage.l1 import BACKINGS

MiB = 1 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("backing", [None, "memfd"])
def test_the_reference_command_line_starts_and_rss_tracks_used_bytes(tmp_path: Path, backing: str | None) -> None:
    adapter = {"type": "fs", "base_path": str(tmp_path), "serde": {"type": "fp8", "fp8_dtype": "float8_e4m3fn"}}
    args = ["--l1-size-gb", "100", "--eviction-policy", "LRU", "--l2-adapter", json.dumps(adapter)]
    args += ["--log-level", "warning"] + (["--l1-backing", backing] if backing else [])
    chunks = [torch.randn(4, 256, 1024).to(torch.bfloat16) for _ in range(16)]  # 16 x 2 MiB
    keys = [ObjectKey("ref", format(i + 1, "x")) for i in range(16)]
    with ServerProcess(args) as server, Client(server.address) as client:
        assert server.proc is not None
        l1 = client.stats()["store"]["l1"]
        assert l1["capacity_bytes"] == 100 << 30 and l1["backing"] == (backing or "anonymous")
        before = rss(server.proc.pid)
        client.store(keys, chunks)
        got = client.retrieve(keys)
        assert all(g is not None and torch.equal(g, c) for g, c in zip(got, chunks, strict=True))
        used = client.stats()["store"]["l1"]["used_bytes"]
        assert used == 32 * MiB
        # Objects stay pinned until their L2 write, and the write allocates the fp8 encoder's scratch: drain before
        # measuring, so that what clear_l1 gives back is not hidden by memory the write-behind took meanwhile.
        deadline = time.monotonic() + 120
        while client.stats()["store"]["l2_pending_bytes"] and time.monotonic() < deadline:
            time.sleep(0.1)
        grown = rss(server.proc.pid) - before
        assert 0.75 * used < grown < used + 128 * MiB, f"RSS grew {grown / MiB:.0f} MiB for {used / MiB:.0f} MiB used"
        client.clear_l1()
        assert client.stats()["store"]["l1"]["used_bytes"] == 0
        assert rss(server.proc.pid) - before < grown - 16 * MiB, "clear gives L1's pages back"
        assert client.lookup(keys) == 16, "the fp8 copies in L2 are still there"


def test_l1_backing_flag_is_checked() -> None:
    assert L1_BACKINGS == BACKINGS
    assert ServerConfig.from_dict({"l1_size_gb": 1, "l1_backing": "memfd"}).store_kwargs()["l1_backing"] == "memfd"
    with pytest.raises(ConfigError, match="l1_backing"):
        ServerConfig.from_dict({"l1_size_gb": 1, "l1_backing": "tmpfs"})
