"""L1 backings: nothing in /dev/shm, lazily touched pages (a 100 GiB pool on a small host), huge pages that
fall back with a warning, and leftover /dev/shm files of dead processes (older versions) removed at start."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvtier import ConfigError, ObjectKey, Store
from kvtier.storage.l1 import Arena

SHM = Path("/dev/shm")
MiB = 1 << 20


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def shm_files_of(pid: int) -> list[str]:
    return [n for n in os.listdir(SHM) if n.startswith(f"kvtier-l1-{pid}-")]


@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_a_100_gib_pool_starts_and_holds_only_what_is_used(backing: str) -> None:
    src = torch.ones(8 * MiB, dtype=torch.uint8)
    before = rss()
    with Store(l1_size_gb=100, l1_backing=backing) as store:
        stats = store.stats()["l1"]
        assert stats["capacity_bytes"] == 100 << 30 and stats["backing"] == backing
        assert "shm_path" not in stats
        # the host cannot give 100 GiB: the pool grows only as far as it can
        assert stats["effective_capacity_bytes"] < 100 << 30
        ks = [ObjectKey("m", format(i + 1, "x")) for i in range(8)]
        store.store(ks, [src] * 8)  # 64 MiB used
        assert not shm_files_of(os.getpid()), "nothing in /dev/shm"
        grown = rss() - before
        assert 60 * MiB < grown < 200 * MiB, f"RSS grew {grown / MiB:.0f} MiB for 64 MiB stored"
        got = store.retrieve(ks[-1:])[0]
        assert got is not None and torch.equal(got, src)
        del got
        store.clear_l1()
        assert rss() - before < 40 * MiB, "clear gives the pages back"
        assert store.stats()["l1"]["used_bytes"] == 0


def test_hugepages_fall_back_with_a_warning_when_none_are_reserved(caplog: pytest.LogCaptureFixture) -> None:
    reserved = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            reserved = int(line.split()[1])
    if reserved * 2 * MiB >= 64 * MiB:
        pytest.skip("this host has huge pages reserved: no fallback to see")
    with caplog.at_level(logging.WARNING, logger="kvtier.storage.l1.arena"):
        arena = Arena(64 * MiB, "hugepages")
    try:
        assert arena.backing in {"anonymous+thp", "anonymous"}
        assert "l1_backing=hugepages" in caplog.text and "vm.nr_hugepages" in caplog.text
        arena.buffer[-1] = 3
        assert int(arena.buffer[-1]) == 3
    finally:
        arena.close()


def test_a_bad_backing_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="l1_backing"):
        Store(l1_size_gb=0.01, l1_backing="tmpfs")


CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    from kvtier import ObjectKey, Store
    # what kvtier before this version left: its L1 as a file in /dev/shm
    old = f"/dev/shm/kvtier-l1-{os.getpid()}-0123456789ab"
    with open(old, "wb") as f:
        f.write(b"x" * (1 << 20))
    stores = [Store(l1_size_gb=1, l1_backing=b) for b in ("anonymous", "memfd", "hugepages")]
    for s in stores:
        s.store([ObjectKey("m", "a")], [torch.ones(1 << 20, dtype=torch.uint8)])
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_sigkilled_processes_leave_nothing_and_old_leftovers_are_removed_at_start() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert shm_files_of(child.pid) == [f"kvtier-l1-{child.pid}-0123456789ab"], "only the old-style file is left"
    # a live process's file is kept (our own pid): only the dead one's goes
    mine = SHM / f"kvtier-l1-{os.getpid()}-ba9876543210"
    mine.write_bytes(b"y")
    try:
        with Store(l1_size_gb=0.01):
            pass
        assert shm_files_of(child.pid) == [], "the dead process's file was removed at start"
        assert mine.exists()
    finally:
        mine.unlink(missing_ok=True)
