"""Invalidation in the embedded Store: delete / purge / clear through L1 and every L2 tier, and the purge fence
(nothing stored before purge() returns is served after it: not from L1, not from a queued or in-flight L2 write,
not from a load in flight). Real adapters (memory, fs, a real redis-server); the faulty adapter only to hold a
write or a load mid-way."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.bench.redis_server import LocalRedis, find_redis_server
from kvtier.errors import ConfigError
from kvtier.l2.adapters import FaultyAdapter, KeyMatch
from kvtier.l2.adapters.redis.adapter import glob_escape
from kvtier.storage import fence as fence_mod
from kvtier.storage.store import Store
from kvtier.types import ObjectKey, salt_digest

MODELS = ("org/a", "org/b")
SALTS = ("", "t1", "t2")


def value(key: ObjectKey, version: int = 0) -> torch.Tensor:
    """A small tensor that names its key and version, so a stale or foreign hit is caught byte for byte."""
    seed = hash((key.model_name, key.chunk_hash, key.cache_salt, version)) & 0x7FFFFFFF
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))


def grid(n: int = 3) -> list[ObjectKey]:
    return [ObjectKey(m, format(0x100 + i, "x"), 0, s) for m in MODELS for s in SALTS for i in range(n)]


def fill(store: Store, keys: list[ObjectKey]) -> None:
    store.store(keys, [value(k) for k in keys])
    store.flush()


def served(store: Store, keys: list[ObjectKey]) -> dict[ObjectKey, bool]:
    out = store.retrieve(keys)
    for k, t in zip(keys, out, strict=True):
        if t is not None:
            assert torch.equal(t, value(k)), f"{k} served wrong bytes"
    return {k: t is not None for k, t in zip(keys, out, strict=True)}


@pytest.fixture(params=["memory", "fs"])
def l2(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "memory":
        return {"type": "memory"}
    return {"type": "fs", "base_path": str(tmp_path / "l2"), "durability": "none"}


@pytest.mark.parametrize(("model", "salt"), [("org/a", None), (None, "t1"), ("org/b", ""), (None, ""), ("org/a", "t2")])
def test_purge_selects_model_salt_or_both_on_every_tier(
    l2: dict[str, Any], model: str | None, salt: str | None
) -> None:
    keys = grid()
    with Store(0.01, l2_adapters=[l2]) as store:
        fill(store, keys)
        result = store.purge(model_name=model, cache_salt=salt)
        gone = {k for k in keys if (model is None or k.model_name == model) and (salt is None or k.cache_salt == salt)}
        assert result["l1"] == len(gone) and result["l2_deleted"] == len(gone) and not result["errors"]
        assert served(store, keys) == {k: k not in gone for k in keys}
        store.clear_l1()  # now from L2 alone
        assert served(store, keys) == {k: k not in gone for k in keys}
        assert store.stats()["invalidations"] == 1


def test_purge_needs_a_selector_and_checks_it() -> None:
    with Store(0.01) as store:
        with pytest.raises(ValueError, match="model_name, cache_salt or both"):
            store.purge()
        with pytest.raises(ConfigError, match="model_name"):
            store.purge(model_name="bad name")
        with pytest.raises(ValueError, match="nothing to clear"):
            store.clear(l1=False, l2=False)


def test_delete_counts_held_keys_and_removes_them_everywhere(l2: dict[str, Any]) -> None:
    keys = grid(2)
    with Store(0.01, l2_adapters=[l2]) as store:
        fill(store, keys)
        store.clear_l1()
        store.retrieve(keys[:1])  # one back in L1, the rest only in L2
        absent = ObjectKey("org/a", "dead", 0, "")
        assert store.delete([keys[0], keys[1], keys[1], absent]) == 2
        assert served(store, keys) == {k: k not in keys[:2] for k in keys}
        assert store.delete([]) == 0


def test_clear_l1_l2_and_both(l2: dict[str, Any]) -> None:
    keys = grid(2)
    with Store(0.01, l2_adapters=[l2]) as store:
        fill(store, keys)
        r = store.clear(l1=False, l2=True)
        assert r["l1"] == 0 and r["l2_deleted"] == len(keys)
        assert all(served(store, keys).values()), "L1 keeps its objects when only L2 is cleared"
        fill(store, keys)
        r = store.clear()  # L1 only
        assert r["l1"] == len(keys) and r["l2"] == []
        assert all(served(store, keys).values()), "loaded again from L2"
        store.clear(l1=True, l2=True)
        assert not any(served(store, keys).values())


def test_a_queued_and_an_in_flight_write_serve_nothing_purged() -> None:
    """A write held inside the adapter (in flight) and a second one queued behind it: purge waits for the first
    (then walks it away) and skips the second; nothing of the model is on L2 afterwards."""
    held, release = threading.Event(), threading.Event()
    with Store(0.01, l2_adapters=[{"type": "faulty", "inner": {"type": "memory"}}]) as store:
        faulty = store._tiers[0].adapter
        assert isinstance(faulty, FaultyAdapter)

        def hold(inner: Any, keys: Any) -> None:
            held.set()
            release.wait(10)

        faulty.before_store = hold
        a = [ObjectKey("org/a", format(i, "x")) for i in range(1, 4)]
        b = [ObjectKey("org/b", format(i, "x")) for i in range(1, 4)]
        store.store(a[:1], [value(a[0])])
        assert held.wait(5)
        faulty.before_store = None
        store.store([*a[1:], *b], [value(k) for k in (*a[1:], *b)])  # queued behind the held write
        done: dict[str, Any] = {}
        purger = threading.Thread(target=lambda: done.update(store.purge(model_name="org/a")))
        purger.start()
        time.sleep(0.2)
        assert purger.is_alive(), "purge waits for the write that began before it"
        release.set()
        purger.join(10)
        assert not purger.is_alive() and not done["errors"]
        store.flush()
        assert faulty.inner.contains([k.to_str() for k in a]) == [False] * 3, "nothing purged reached L2"
        assert faulty.inner.contains([k.to_str() for k in b]) == [True] * 3, "nothing else lost"
        assert store.stats()["purge_skipped_writes"] == 2
        assert served(store, a + b) == {k: k in b for k in a + b}


def test_a_load_in_flight_when_the_purge_walks_l2_serves_nothing() -> None:
    """Between the L1 sweep and the L2 walk the record is still on L2: a retrieve then (here from the purge's own
    progress callback, deterministic) reads it but neither puts it into L1 nor hands it out; a store of the model
    meanwhile is skipped."""
    with Store(0.01, l2_adapters=[{"type": "memory"}]) as store:
        keys = grid(2)
        fill(store, keys)
        a = [k for k in keys if k.model_name == "org/a"]
        seen: list[Any] = []

        def during(doc: dict[str, Any]) -> None:
            if doc["state"] == "l1 done" and not seen:
                seen.append(store.retrieve(a))
                seen.append(store.lookup(a))
                store.store(a[:1], [value(a[0], version=1)])

        store.purge(model_name="org/a", progress=during)
        assert seen[0] == [None] * len(a) and seen[1] == 0
        assert store._pool.contains(a) == [False] * len(a), "the load did not put the record into L1"
        stats = store.stats()
        assert stats["purge_skipped_loads"] == len(a) and stats["purge_skipped_stores"] == 1
        assert served(store, keys) == {k: k.model_name != "org/a" for k in keys}
        store.store(a[:1], [value(a[0])])  # after purge returned: stored and served again
        assert served(store, a[:1]) == {a[0]: True}


def test_a_load_that_began_before_the_purge_is_waited_for_and_swept() -> None:
    """A load held inside the adapter when purge begins: purge waits for it, then sweeps what it put into L1."""
    held, release = threading.Event(), threading.Event()
    with Store(0.01, l2_adapters=[{"type": "faulty", "inner": {"type": "memory"}}]) as store:
        faulty = store._tiers[0].adapter
        assert isinstance(faulty, FaultyAdapter)
        a = [ObjectKey("org/a", "a1")]
        fill(store, a)
        store.clear_l1()

        def hold(inner: Any, keys: Any) -> None:
            held.set()
            release.wait(10)

        faulty.before_load = hold
        reader = threading.Thread(target=lambda: store.retrieve(a))
        reader.start()
        assert held.wait(5)
        purger = threading.Thread(target=lambda: store.purge(model_name="org/a"))
        purger.start()
        time.sleep(0.2)
        assert purger.is_alive()
        release.set()
        reader.join(10)
        purger.join(10)
        faulty.before_load = None
        assert store._pool.contains(a) == [False] and served(store, a) == {a[0]: False}


def test_an_l2_failure_is_reported_and_the_other_tiers_purged(tmp_path: Path) -> None:
    tiers = [{"type": "faulty", "inner": {"type": "memory"}}, {"type": "memory"}]
    with Store(0.01, l2_adapters=tiers) as store:
        keys = grid(1)
        fill(store, keys)
        faulty = store._tiers[0].adapter
        assert isinstance(faulty, FaultyAdapter)
        faulty.purge_error = OSError(5, "injected")
        r = store.purge(cache_salt="t1")
        assert len(r["errors"]) == 1 and "injected" in r["errors"][0] and r["l2"][1]["deleted"] == 2
        assert "t1" not in str(r), "a salt never appears in a result"


def test_purge_while_clients_store_and_retrieve() -> None:
    """Writers of two models keep storing and reading while model a is purged: after purge returns nothing of a
    stored before is served, and every b object is still there, byte for byte."""
    with Store(0.05, l2_adapters=[{"type": "memory"}]) as store:
        stop = threading.Event()
        errors: list[BaseException] = []
        a_keys: list[ObjectKey] = []
        b_keys: list[ObjectKey] = []

        def work(model: str, out: list[ObjectKey]) -> None:
            i = 0
            try:
                while not stop.is_set():
                    k = ObjectKey(model, format(0x1000 + i, "x"))
                    store.store([k], [value(k)])
                    out.append(k)
                    got = store.retrieve([k])[0]
                    assert got is None or torch.equal(got, value(k))
                    i += 1
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(m, out)) for m, out in (("org/a", a_keys), ("org/b", b_keys))]
        for t in threads:
            t.start()
        time.sleep(0.3)
        stored_before = list(a_keys)  # each key is stored once: these were stored before purge() began
        store.purge(model_name="org/a", batch_size=7)
        assert store.retrieve(stored_before) == [None] * len(stored_before)
        stop.set()
        for t in threads:
            t.join(10)
        assert not errors, errors
        assert stored_before and store.retrieve(stored_before) == [None] * len(stored_before)
        store.flush()
        assert all(served(store, b_keys).values()), "nothing of another model is lost"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("store"), st.integers(0, 11)),
            st.tuples(st.just("retrieve"), st.integers(0, 11)),
            st.tuples(st.just("purge"), st.sampled_from([*MODELS, None]), st.sampled_from([*SALTS, None])),
            st.tuples(st.just("delete"), st.integers(0, 11)),
            st.tuples(st.just("clear_l1")),
            st.tuples(st.just("flush")),
        ),
        max_size=30,
    )
)
def test_random_interleavings_match_an_oracle(ops: list[tuple[Any, ...]]) -> None:
    """Store / retrieve / purge / delete / clear_l1 in any order, L1 small enough to evict: a retrieve returns
    what the oracle holds (or a miss, a cache may drop), never something purged or deleted."""
    universe = [ObjectKey(m, format(0x10 + i, "x"), 0, s) for m in MODELS for s in SALTS[:2] for i in range(3)]
    oracle: dict[ObjectKey, int] = {}
    version = 0
    with Store(64 * 1024 / (1 << 30), l2_adapters=[{"type": "memory"}]) as store:
        for op in ops:
            if op[0] == "store":
                k = universe[op[1]]
                version += 1
                store.store([k], [value(k, version)])
                oracle[k] = version
            elif op[0] == "retrieve":
                k = universe[op[1]]
                got = store.retrieve([k])[0]
                if k not in oracle:
                    assert got is None, f"{k} served after it was purged"
                elif got is not None:
                    assert torch.equal(got, value(k, oracle[k])), f"{k}: stale version served"
            elif op[0] == "purge":
                if op[1] is None and op[2] is None:
                    continue
                store.purge(model_name=op[1], cache_salt=op[2])
                for k in list(oracle):
                    if (op[1] is None or k.model_name == op[1]) and (op[2] is None or k.cache_salt == op[2]):
                        del oracle[k]
            elif op[0] == "delete":
                store.delete([universe[op[1]]])
                oracle.pop(universe[op[1]], None)
            elif op[0] == "clear_l1":
                store.clear_l1()
            else:
                store.flush()


def test_fence_costs_nothing_when_no_purge_ran() -> None:
    f = fence_mod.PurgeFence()
    gen = f.enter()
    assert f.blocked([ObjectKey("m", "1")], gen) is None
    f.leave(gen)
    fence = f.open(lambda k: k.model_name == "m")
    old = gen
    assert f.blocked([ObjectKey("m", "1"), ObjectKey("n", "1")], old) == [True, False]
    f.close(fence)
    assert f.blocked([ObjectKey("m", "1")], old) == [True], "an op stamped before the purge ended stays blocked"
    assert f.blocked([ObjectKey("m", "1")], fence_mod.stamp()) is None


# -- real Redis ---------------------------------------------------------------------------------------------------
needs_redis = pytest.mark.skipif(find_redis_server() is None, reason="redis-server is not installed")


@pytest.fixture(scope="module")
def redis() -> Iterator[LocalRedis]:
    if find_redis_server() is None:
        pytest.skip("redis-server is not installed")
    with LocalRedis() as srv:
        yield srv


@needs_redis
def test_purge_on_redis_by_model_salt_and_both(redis: LocalRedis) -> None:
    prefix = uuid.uuid4().hex
    keys = grid()
    with Store(0.01, l2_adapters=[{"type": "redis", "url": redis.url, "key_prefix": prefix}]) as store:
        fill(store, keys)
        store.clear_l1()
        store.purge(model_name="org/a", cache_salt="t1")
        store.purge(cache_salt="t2")
        r = store.purge(model_name="org/b")
        gone = {
            k
            for k in keys
            if k.cache_salt == "t2" or k.model_name == "org/b" or (k.model_name, k.cache_salt) == ("org/a", "t1")
        }
        assert not r["errors"]
        assert served(store, keys) == {k: k not in gone for k in keys}
        assert store.stats()["l2"][0]["used_bytes"] > 0


@needs_redis
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="ab*?[]\\^-:.", min_size=1, max_size=6))
def test_redis_glob_metacharacters_in_prefixes_match_only_themselves(redis: LocalRedis, tail: str) -> None:
    """Two prefixes where one is the other read as a glob ("a*" vs "ab"): a purge under one never touches the
    other's records."""
    from kvtier.l2.adapters import create_backend

    base = uuid.uuid4().hex[:8]
    mine = create_backend({"type": "redis", "url": redis.url, "key_prefix": base + tail})
    other_prefix = base + tail.replace("*", "x").replace("?", "y").replace("[", "(").replace("]", ")").replace(
        "\\", "/"
    )
    other = create_backend({"type": "redis", "url": redis.url, "key_prefix": other_prefix + "z"})
    with mine, other:
        k = ObjectKey("org/m+1:x.y", "ab", 0, "s").to_str()
        mine.store_records([k], [[b"1"]])
        other.store_records([k], [[b"2"]])
        assert mine.purge(KeyMatch("org/m+1:x.y", salt_digest("s"))) == 1
        assert mine.contains([k]) == [False] and other.contains([k]) == [True]
        assert glob_escape("a*b") == "a\\*b"
        other.purge(KeyMatch())


# -- key mappings the efficient paths rely on ----------------------------------------------------------------------
_model_names = st.from_regex(r"[A-Za-z0-9._\-+:]{1,12}(/[A-Za-z0-9._\-+:]{1,12}){0,2}", fullmatch=True).filter(
    lambda m: ".." not in m.split("/")
)


@settings(max_examples=200, deadline=None)
@given(_model_names, st.text(max_size=8), st.integers(0, 65535), st.binary(min_size=1, max_size=20))
def test_object_names_map_back_to_their_keys_and_listing_prefixes_cover_them(
    model: str, salt: str, rank: int, h: bytes
) -> None:
    """The object store lists by name prefix and maps each name back to its key string: for any key, its name
    maps back to it exactly, and one of the listing prefixes of a purge of its model (and tenant) covers it."""
    from kvtier.l2.adapters.object_store import key_of_name, list_prefixes, object_name

    key = ObjectKey(model, h, rank, salt)
    text = key.to_str()
    name = object_name(text)
    assert key_of_name(name) == text
    for match in (KeyMatch(model, None), KeyMatch(model, key.salt_digest), KeyMatch(None, key.salt_digest)):
        assert match.matches(text)
        assert any(name.startswith(p) for p in list_prefixes(match)), (name, match)
    other = KeyMatch(model + "x", None)
    assert not other.matches(text)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ab*?[]\\^-:.%@", min_size=1, max_size=10), _model_names)
def test_redis_scan_patterns_escape_every_glob_metacharacter(prefix: str, model: str) -> None:
    """The SCAN pattern of a purge matches the records of its model under its prefix and, read as a glob (the
    rules Redis applies), nothing under a prefix that only a glob would confuse with it."""
    import fnmatch

    from kvtier.l2.adapters.redis.adapter import RedisAdapter

    adapter = RedisAdapter("redis://127.0.0.1:1/0", key_prefix=prefix)
    key = ObjectKey(model, "ab", 0, "t").to_str()
    pattern = adapter.scan_pattern(KeyMatch(model, salt_digest("t")))
    # fnmatch knows no backslash escapes: turn each escaped character into a one-character class, as Redis reads it
    as_fnmatch = re.sub(r"\\(.)", lambda m: "[" + m.group(1) + "]" if m.group(1) != "]" else "[]]", pattern)
    assert fnmatch.fnmatchcase(f"{prefix}:{key}", as_fnmatch)
    decoy = prefix.replace("*", "Z").replace("?", "Q").replace("[", "(")
    if decoy != prefix:
        assert not fnmatch.fnmatchcase(f"{decoy}:{key}", as_fnmatch)


_PROBE = """
import json, sys
from kvtier.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    results.append([argv, code, "torch" in sys.modules])
print(json.dumps(results))
"""


def test_client_command_help_and_usage_errors_do_not_import_torch() -> None:
    cases = [["ping", "--help"], ["purge", "--help"], ["lookup", "--model", "m"], ["clear", "--bogus"], ["--help"]]
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True, text=True, timeout=120, check=False
    )
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r[1] for r in results] == [0, 0, 2, 2, 0]
    assert not any(r[2] for r in results), results


@pytest.mark.parametrize("leaf", ["ab12.r0", "ab12.r01", "ab12.r²", "ab12.r-1", "ab12.r"])
def test_a_record_name_kvtier_never_writes_maps_to_no_key(leaf: str) -> None:
    """object_name writes a rank above 0 as ``.r<decimal>`` without a leading zero: any other rank suffix is no
    record of kvtier's (it used to map to a key string whose own name is another one, or with "²" to a rank that
    made int() raise wherever the key string was read)."""
    from kvtier.l2.adapters.object_store import key_of_name, object_name

    assert key_of_name(f"m/_/{leaf}.kvtr") is None
    assert key_of_name(object_name(ObjectKey("m", "ab12", 3).to_str())) == "m@3@@ab12"
