"""The fs adapter beyond the conformance suite: crash safety (SIGKILL), restart recovery, corruption on disk,
disk full, capacity with each eviction policy."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier import CapacityError
from kvtier.l2.adapters import FSAdapter, create_l2_adapter
from kvtier.l2.adapters import fs as fs_module
from kvtier.l2.tier import L2Tier
from kvtier.testing.adapters import chunk, keys

SRC = Path(__file__).resolve().parents[1] / "src"


def tier(base: Path, **extra: Any) -> L2Tier:
    return create_l2_adapter({"type": "fs", "base_path": str(base), "durability": "none", **extra})


def fs(t: L2Tier) -> FSAdapter:
    assert isinstance(t.adapter, FSAdapter)
    return t.adapter


def loads(t: L2Tier, ks: list[Any], tokens: int = 16) -> list[bool]:
    return t.load_into(ks, [torch.empty_like(chunk(0, tokens)) for _ in ks])


def test_restart_rebuilds_index_and_usage(tmp_path: Path) -> None:
    ks = keys(6)
    with tier(tmp_path) as t:
        t.store(ks, [chunk(i) for i in range(6)])
        used = fs(t).used_bytes
    with tier(tmp_path) as again:
        assert again.contains(ks) == [True] * 6
        assert fs(again).used_bytes == used
        outs = [torch.empty_like(chunk(0)) for _ in ks]
        assert again.load_into(ks, outs) == [True] * 6
        assert all(torch.equal(o, chunk(i)) for i, o in enumerate(outs))
    # a smaller capacity at restart evicts down to it
    record = used // 6
    with tier(tmp_path, max_capacity_gb=3.5 * record / (1 << 30)) as small:
        assert fs(small).used_bytes <= 3 * record
        assert sum(small.contains(ks)) == 3


def test_each_corruption_kind_is_a_miss_and_removed(tmp_path: Path) -> None:
    ks = keys(7)
    with tier(tmp_path) as t:
        t.store(ks, [chunk(i) for i in range(7)])
        paths = [fs(t).path_for(k.to_str()) for k in ks]
    data = [p.read_bytes() for p in paths]
    flipped = bytearray(data[0])
    flipped[len(flipped) // 2] ^= 4
    paths[0].write_bytes(bytes(flipped))  # flipped bit in the payload: found by the load's checksum
    paths[1].write_bytes(data[1][:-100])  # truncated
    paths[2].write_bytes(data[2] + b"\0" * 64)  # padded
    paths[3].write_bytes(b"this is not a kvtier record" * 10)  # foreign file
    paths[4].write_bytes(data[5])  # another key's record under this key's name
    header = bytearray(data[6])
    header[40] = 250  # unknown dtype code (checksum also fails)
    paths[6].write_bytes(bytes(header))
    stray = paths[0].with_name(".leftover.123.0.tmp")
    stray.write_bytes(data[0][:1000])  # a write cut short by a crash
    with tier(tmp_path) as again:
        assert fs(again).stats()["removed_at_start"] == 6  # the first operation rebuilds the index
        # truncated, padded, foreign, misplaced and bad-header files are removed while the index is rebuilt
        for p in (paths[1], paths[2], paths[3], paths[4], paths[6], stray):
            assert not p.exists(), p
        assert again.contains(ks) == [True, False, False, False, False, True, False]
        assert loads(again, ks) == [False, False, False, False, False, True, False]
        assert not paths[0].exists(), "a record failing its checksum is removed by the load"
        assert again.stats()["integrity_misses"] == 1


def test_wrong_serde_records_are_foreign(tmp_path: Path) -> None:
    ks = keys(2)
    with tier(tmp_path) as t:
        t.store(ks, [chunk(0), chunk(1)])
    with tier(tmp_path, serde={"type": "raw"}) as other:  # raw with a config, a different identity than none
        assert other.lookup(ks) == [False, False], "a foreign record is not a hit"
        assert loads(other, ks) == [False, False]
        assert other.contains(ks) == [True, True], "a foreign record is left in place"
        assert other.stats()["foreign_misses"] == 2 and other.stats()["integrity_misses"] == 0


def test_disk_full_mid_batch_fails_cleanly_and_loads_keep_working(tmp_path: Path, monkeypatch: Any) -> None:
    old = keys(2)
    with tier(tmp_path) as t:
        t.store(old, [chunk(0), chunk(1)])
        used = fs(t).used_bytes
        real_writev = os.writev
        calls = 0

        def writev(fd: int, bufs: Any) -> int:
            nonlocal calls
            calls += 1
            if calls == 3:
                real_writev(fd, [memoryview(bufs[0])[:10]])  # part of a file lands, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_writev(fd, bufs)

        monkeypatch.setattr(fs_module.os, "writev", writev)
        new = keys(5, start=10)
        with pytest.raises(CapacityError, match="disk full"):
            t.store(new, [chunk(i) for i in range(5)])
        monkeypatch.undo()
        assert t.contains(new) == [False] * 5
        assert fs(t).used_bytes == used
        assert fs(t).stats()["disk_full"] == 1
        assert not list(tmp_path.rglob("*.tmp")), "no temporary file may stay behind"
        assert not any(fs(t).path_for(k.to_str()).exists() for k in new)
        assert loads(t, old) == [True, True]
        t.store(new, [chunk(i) for i in range(5)])  # space is back: stores work again
        assert loads(t, new) == [True] * 5


@pytest.mark.parametrize(
    ("policy", "survivors"),
    [("LRU", [True, False, True, True, True]), ("FIFO", [False, True, True, True, True])],
)
def test_capacity_eviction_follows_the_policy(tmp_path: Path, policy: str, survivors: list[bool]) -> None:
    record = 1000
    adapter = create_l2_adapter(
        {
            "type": "fs",
            "base_path": str(tmp_path),
            "durability": "none",
            "eviction_policy": policy,
            "max_capacity_gb": 4 * record / (1 << 30),
        }
    ).adapter
    with adapter:
        for i in range(4):
            adapter.store_records([f"k{i}"], [[bytes(record)]])
        adapter.load_records(["k0"], [[bytearray(record)]])  # a read: matters to LRU, not to FIFO
        adapter.store_records(["k4"], [[bytes(record)]])
        assert adapter.contains([f"k{i}" for i in range(5)]) == survivors
        assert adapter.used_bytes <= 4 * record


def test_bad_config_fails_at_start(tmp_path: Path) -> None:
    from kvtier import ConfigError

    with pytest.raises(ConfigError, match=r"base_path: required"):
        create_l2_adapter({"type": "fs"})
    with pytest.raises(ConfigError, match=r"durability: expected one of \['fsync', 'none'\]"):
        create_l2_adapter({"type": "fs", "base_path": str(tmp_path), "durability": "sometimes"})
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        create_l2_adapter({"type": "fs", "base_path": str(f)})
    t = tier(tmp_path / "lazy")
    assert not (tmp_path / "lazy").exists(), "the directory is created by the first operation, not by the config"
    t.close()


WRITER = textwrap.dedent(
    """
    import sys
    from kvtier.l2.adapters import create_l2_adapter
    from kvtier.testing.adapters import chunk, keys
    t = create_l2_adapter({"type": "fs", "base_path": sys.argv[1], "durability": "fsync"})
    i = 0
    while True:
        t.store(keys(1, start=i), [chunk(i, tokens=4096)])
        i += 1
        print(i, flush=True)
    """
)


def test_sigkill_mid_store_leaves_no_visible_partial_record(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        for _ in range(3):  # let a few records land, then kill during the next ones
            assert proc.stdout.readline(), "writer died early"
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with tier(tmp_path) as t:
        n = fs(t).stats()["records"]
        assert n >= 3
        assert not list(tmp_path.rglob("*.tmp")), "leftover temporary files are removed at start"
        ks = keys(n + 2)
        outs = [torch.empty_like(chunk(0, tokens=4096)) for _ in ks]
        hits = t.load_into(ks, outs)
        assert hits[:n] == [True] * n and hits[n:] == [False, False]
        for i in range(n):
            assert torch.equal(outs[i], chunk(i, tokens=4096))
        assert t.stats()["integrity_misses"] == 0


def test_a_changed_record_is_never_renamed_over_the_old_one(tmp_path: Path, monkeypatch: Any) -> None:
    """ext4 (``auto_da_alloc``) writes a file back to disk inside a rename that replaces an existing file, on the
    writer's time: it doubled the cost of re-storing a record with ``durability: "none"``. The old record is
    removed first; the key then loads the new record, and a re-store in the same batch keeps the last one."""
    renames: list[bool] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        renames.append(os.path.exists(dst))
        real_replace(src, dst)

    monkeypatch.setattr(fs_module.os, "replace", replace)
    ks = keys(3)
    with tier(tmp_path) as t:
        t.store(ks, [chunk(i) for i in range(3)])
        t.store(ks, [chunk(10 + i) for i in range(3)])
        t.store([ks[0], ks[0]], [chunk(20), chunk(21)])
        assert renames == [False] * 8
        outs = [torch.empty_like(chunk(0)) for _ in ks]
        assert t.load_into(ks, outs) == [True] * 3
        assert [torch.equal(o, w) for o, w in zip(outs, [chunk(21), chunk(11), chunk(12)], strict=True)] == [True] * 3
        assert fs(t).used_bytes == sum(os.path.getsize(fs(t).path_for(k.to_str())) for k in ks)


@pytest.mark.parametrize("read", ["load_records", "load_records_with"])
def test_a_load_that_misses_during_a_re_store_keeps_the_new_record_accounted(
    tmp_path: Path, monkeypatch: Any, read: str
) -> None:
    """A load that finds no file forgets the key; a re-store lands its record between that load's failed open and
    its forgetting (the old record is removed before the new one gets its name, so a load can miss a key being
    re-stored). The new record must stay in the index: else it is on disk but neither counted against the
    capacity nor ever evicted, and lookups say it is absent."""
    ks = keys(1)
    name = ks[0].to_str()
    with tier(tmp_path) as t:
        adapter = fs(t)
        adapter.store_records([name], [[b"old record"]])
        final = str(adapter.path_for(name))
        real_open = os.open
        raced = []

        def racing_open(path: Any, flags: int, *args: Any) -> int:
            if str(path) == final and flags == os.O_RDONLY and not raced:
                raced.append(True)
                adapter.store_records([name], [[b"the new record"]])  # lands after this open failed
                raise FileNotFoundError(path)
            return real_open(path, flags, *args)

        monkeypatch.setattr(fs_module.os, "open", racing_open)
        if read == "load_records":
            assert adapter.load_records([name], [[bytearray(64)]]) == [-1]
        else:
            assert adapter.load_records_with([name], 8, lambda i, head, n: None) == [-1]
        monkeypatch.undo()
        assert raced and adapter.contains([name]) == [True]
        assert adapter.used_bytes == os.path.getsize(final) == len(b"the new record")
        buf = bytearray(64)
        assert adapter.load_records([name], [[buf]]) == [14] and bytes(buf[:14]) == b"the new record"


def test_concurrent_re_stores_and_loads_keep_the_index_equal_to_the_disk(tmp_path: Path) -> None:
    """Writers re-store a few keys with records of changing sizes while readers load them: every load returns a
    whole record of one of the stored versions or a miss, and afterwards the index (what is counted against the
    capacity and evicted) holds exactly the files on disk."""
    import threading

    names = [k.to_str() for k in keys(4)]
    versions = [bytes([v]) * (100 + 37 * v) for v in range(6)]
    with tier(tmp_path) as t:
        adapter = fs(t)
        adapter.store_records(names, [[versions[0]] for _ in names])
        stop = threading.Event()
        bad: list[object] = []

        def write(seed: int) -> None:
            for n in range(150):
                adapter.store_records([names[(seed + n) % 4]], [[versions[(seed + n) % 6]]])

        def read() -> None:
            buf = bytearray(1024)
            while not stop.is_set():
                for name in names:
                    n = adapter.load_records([name], [[buf]])[0]
                    if n != -1 and bytes(buf[:n]) not in versions:
                        bad.append((name, n))

        readers = [threading.Thread(target=read) for _ in range(2)]
        writers = [threading.Thread(target=write, args=(s,)) for s in range(2)]
        for th in readers + writers:
            th.start()
        for th in writers:
            th.join()
        stop.set()
        for th in readers:
            th.join()
        assert not bad
        assert adapter.contains(names) == [True] * 4
        assert adapter.used_bytes == sum(os.path.getsize(adapter.path_for(n)) for n in names)
