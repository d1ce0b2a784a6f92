"""Tenants (cache_salt) and models: exact usage accounting in L1 and in the L2 adapters with a capacity index,
per-tenant quotas that evict a tenant's own chunks first, their config, and no salt in stats or metrics."""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from kvtier import CapacityError, ConfigError, ObjectKey, Store
from kvtier.bench.local_s3 import LocalS3, moto_available
from kvtier.l2.adapters import create_l2_adapter
from kvtier.server.metrics import MAX_LABELLED, OTHER, flatten_stats
from kvtier.storage.l1 import L1Object, L1Pool
from kvtier.storage.policies import create_policy
from kvtier.tenants import TenantQuotas, UsageLedger, main, parse_quota_flag, tenant_of_key_str
from kvtier.types import salt_digest
from test_l1_lifetime import PoolMachine

KiB = 1024
GiB = 1 << 30
SALTS = ["", "alice-7f3e9a1c-secret", "bob-0c55d2e8-secret"]


def tkey(i: int, salt: str = "", model: str = "m") -> ObjectKey:
    return ObjectKey(model, format(i + 1, "x"), 0, salt)


def kib_gb(n: float) -> float:
    return n * KiB / GiB


def put(pool: L1Pool, k: ObjectKey, nbytes: int = 4 * KiB) -> None:
    pool.commit(pool.reserve(k, (nbytes,), torch.uint8))


def tenants(pool: L1Pool) -> dict[str, Any]:
    t: dict[str, Any] = pool.stats()["tenants"]
    return t


# -- quotas in the L1 pool -----------------------------------------------------------------------------------------
def test_a_tenant_at_its_quota_evicts_its_own_chunks_in_policy_order_not_others() -> None:
    a, b = salt_digest(SALTS[1]), salt_digest(SALTS[2])
    pool = L1Pool(1 << 20, "LRU", quotas=TenantQuotas(default=16 * KiB))
    try:
        for i in range(4):
            put(pool, tkey(i, SALTS[1]))
            put(pool, tkey(100 + i, SALTS[2]))
        pool.release(pool.acquire([tkey(0, SALTS[1])]))  # alice's chunk 0 is now her most recently used
        for i in range(4, 6):  # alice's burst: two more chunks over her quota
            put(pool, tkey(i, SALTS[1]))
        assert pool.contains([tkey(i, SALTS[1]) for i in range(6)]) == [True, False, False, True, True, True]
        assert all(pool.contains([tkey(100 + i, SALTS[2]) for i in range(4)])), "bob lost chunks to alice's burst"
        got = tenants(pool)
        assert got[a] == {"bytes": 16 * KiB, "objects": 4, "quota_bytes": 16 * KiB}
        assert got[b] == {"bytes": 16 * KiB, "objects": 4, "quota_bytes": 16 * KiB}
        assert pool.stats()["quota_evictions"] == 2 and pool.stats()["evictions"] == 2
    finally:
        pool.close()


def test_quota_evictions_are_reported_to_on_evict_outside_the_lock() -> None:
    seen: list[list[ObjectKey]] = []
    pool: L1Pool

    def on_evict(keys: Any) -> None:
        pool.stats()  # takes the pool lock: called inside it, this would deadlock
        seen.append(list(keys))

    pool = L1Pool(1 << 20, "LRU", quotas=TenantQuotas(default=8 * KiB), on_evict=on_evict)
    try:
        for i in range(4):
            put(pool, tkey(i, SALTS[1]))
        put(pool, tkey(0, SALTS[1]))  # a replacement is not an eviction
        pool.clear()  # nor is a clear
        assert seen == [[tkey(0, SALTS[1])], [tkey(1, SALTS[1])], [tkey(2, SALTS[1])]]
    finally:
        pool.close()


def test_quota_evictions_are_kv_events_in_l1_and_l2(tmp_path: Path) -> None:
    from kvtier.events import L1_TIER
    from test_events import Collector, settle

    fs = adapter_config("fs", tmp_path, tenant_quota_gb=kib_gb(24))  # a batch of 5 records (4 KiB each) fits
    with Store(1 / 1024, l2_adapters=[fs], l1_quota_gb=kib_gb(8)) as store:
        got = Collector()
        store.add_listener(got)
        keys = [tkey(i, SALTS[1]) for i in range(10)]
        for batch in (keys[:5], keys[5:]):  # each trims L1 as its L2 write lands
            store.store(batch, [torch.full((1024,), float(i)) for i in range(5)])
            store.flush()
        settle(store)
        l1_evicted = [e.hash for e in got.of("evicted", L1_TIER)]
        # which 8: the oldest unpinned ones when the quota trims (several L2 writers release pins in any order)
        assert len(set(l1_evicted)) == 8 and set(l1_evicted) <= {k.chunk_hash for k in keys}
        assert store.stats()["l1"]["quota_evictions"] == 8
        l2_evicted = [e for e in got.of("evicted") if e.tier != L1_TIER]
        assert len(l2_evicted) == store.stats()["l2"][0]["quota_evictions"] > 0
        assert all(e.salt == salt_digest(SALTS[1]) for e in got.of("evicted"))


def test_quota_overrides_by_digest_and_the_unsalted_tenant() -> None:
    a = salt_digest(SALTS[1])
    quotas = TenantQuotas(default=8 * KiB, overrides={a: 20 * KiB, "": None})
    pool = L1Pool(1 << 20, "FIFO", quotas=quotas)
    try:
        for i in range(10):
            put(pool, tkey(i, SALTS[1]))
            put(pool, tkey(100 + i, SALTS[2]))
            put(pool, tkey(200 + i))  # no salt: exempted by its override
        got = tenants(pool)
        assert got[a]["bytes"] == 20 * KiB and got[a]["quota_bytes"] == 20 * KiB
        assert got[salt_digest(SALTS[2])]["bytes"] == 8 * KiB
        assert got[""] == {"bytes": 40 * KiB, "objects": 10, "quota_bytes": None}
        assert pool.contains([tkey(i, SALTS[1]) for i in range(10)]) == [False] * 5 + [True] * 5, "FIFO within alice"
    finally:
        pool.close()


def test_a_tenant_goes_over_its_quota_only_by_pinned_objects_and_trims_when_they_go() -> None:
    a = salt_digest(SALTS[1])
    evicted: list[ObjectKey] = []
    pool = L1Pool(1 << 20, "LRU", quotas=TenantQuotas(default=8 * KiB), on_evict=evicted.extend)
    try:
        with pytest.raises(CapacityError, match="larger than the quota") as info:
            pool.reserve(tkey(0, SALTS[1]), (9 * KiB,), torch.uint8)
        assert SALTS[1] not in str(info.value) and a in str(info.value)
        put(pool, tkey(1, SALTS[1]))
        put(pool, tkey(2, SALTS[1]))
        pinned = pool.acquire([tkey(1, SALTS[1]), tkey(2, SALTS[1])])  # reads in flight: nothing of hers evictable
        obj = pool.reserve(tkey(3, SALTS[1]), (4 * KiB,), torch.uint8)  # over her quota, by pinned objects only
        pool.commit(obj, keep_pin=True)  # as a store waiting for its L2 write
        assert tenants(pool)[a]["bytes"] == 12 * KiB and not evicted
        put(pool, tkey(4, SALTS[2]))  # another tenant is not affected
        pool.release(pinned)  # her oldest goes as soon as it can
        assert tenants(pool)[a]["bytes"] == 8 * KiB and evicted == [tkey(1, SALTS[1])]
        pool.release([obj])
        assert pool.contains([tkey(i, SALTS[1]) for i in range(1, 4)]) == [False, True, True]
        stats = pool.stats()
        assert stats["quota_refused"] == 1 and stats["quota_evictions"] == 1
        assert tenants(pool)[salt_digest(SALTS[2])]["objects"] == 1
    finally:
        pool.close()


def test_a_store_batch_larger_than_the_quota_still_reaches_l2_and_l1_trims_to_the_quota() -> None:
    d = salt_digest(SALTS[1])
    keys = [tkey(i, SALTS[1]) for i in range(8)]
    values = [torch.full((1024,), float(i)) for i in range(8)]  # 8 x 4 KiB against a quota of 12 KiB
    with Store(1 / 1024, l2_adapters=[{"type": "memory"}], l1_quota_gb=kib_gb(12)) as store:
        store.store(keys, values)
        store.flush()
        stats = store.stats()
        assert stats["l1_store_refused"] == 0 and stats["l2_written"] == 8
        assert stats["l1"]["tenants"][d]["bytes"] <= 12 * KiB
        assert store._pool.contains(keys) == [False] * 5 + [True] * 3
        got = store.retrieve(keys)  # the rest from L2
        assert all(g is not None and torch.equal(g, v) for g, v in zip(got, values, strict=True))
        assert store.stats()["l1"]["tenants"][d]["bytes"] <= 12 * KiB


def test_a_quota_of_zero_keeps_a_tenant_out_of_the_cache_and_others_in() -> None:
    d = salt_digest(SALTS[2])
    with Store(1 / 1024, l2_adapters=[{"type": "memory"}], l1_quotas_gb={d: 0}) as store:
        k = tkey(0, SALTS[2])
        store.store([k], [torch.ones(1024)])
        assert store.stats()["l1_store_refused"] == 1  # no L1 room for this tenant: nothing queued for L2 either
        other = tkey(1, SALTS[1])
        store.store([other], [torch.ones(1024)])
        store.flush()
        store.clear_l1()
        (got,) = store.retrieve([other])
        assert got is not None


def test_storing_one_key_10000_times_under_a_quota_keeps_one_block() -> None:
    t = torch.arange(1024, dtype=torch.float32)
    d = salt_digest(SALTS[1])
    with Store(0.01, l1_quota_gb=kib_gb(8)) as store:
        for i in range(10_000):
            store.store([tkey(0, SALTS[1])], [t + i])
        l1 = store.stats()["l1"]
        assert l1["tenants"][d] == {"bytes": 4096, "objects": 1, "quota_bytes": 8192}
        assert l1["models"] == {"m": {"bytes": 4096, "objects": 1}}
        assert l1["quota_evictions"] == 0
        store.clear_l1()
        assert store.stats()["l1"]["tenants"] == {} and store.stats()["l1"]["models"] == {}


@pytest.mark.parametrize("with_l2", [False, True])
def test_concurrent_tenants_keep_exact_usage_and_their_quotas(tmp_path: Path, with_l2: bool) -> None:
    adapters = [{"type": "fs", "base_path": str(tmp_path), "durability": "none"}] if with_l2 else []
    errors: list[BaseException] = []
    with Store(kib_gb(256), l2_adapters=adapters, l1_quota_gb=kib_gb(40), max_pending_l2_writes=512) as store:

        def work(seed: int) -> None:
            try:
                for i in range(200):
                    salt = SALTS[(seed + i) % 3]
                    k = [tkey((seed * 31 + i) % 17, salt, f"m{i % 2}"), tkey(i % 5, salt, "m0")]
                    store.store(k, [torch.full((1024,), float(seed)) for _ in k])
                    store.retrieve(k)
                    if i % 50 == 49:
                        store.clear_l1()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        store.flush()
        assert not errors, errors[:1]
        l1 = store.stats()["l1"]
        assert sum(v["bytes"] for v in l1["tenants"].values()) == l1["used_bytes"]
        assert sum(v["objects"] for v in l1["tenants"].values()) == l1["objects"]
        assert sum(v["bytes"] for v in l1["models"].values()) == l1["used_bytes"]
        assert sum(v["objects"] for v in l1["models"].values()) == l1["objects"]
        assert all(v["bytes"] <= 40 * KiB for v in l1["tenants"].values())
        assert l1["used_bytes"] == l1["objects"] * 4096
        store.clear_l1()
        assert store.stats()["l1"]["tenants"] == {}


class TenantPoolMachine(PoolMachine):
    """The pool's state machine with keys of three tenants and two models, under quotas: every tenant's and
    model's bytes are the blocks of its reserved, indexed and pinned objects, its objects its indexed ones, they
    add up to the pool's totals, and a tenant over its quota has every object pinned."""

    QUOTAS = TenantQuotas(default=6 * KiB, overrides={salt_digest(SALTS[2]): 3 * KiB, "": None})

    def __init__(self) -> None:
        super().__init__()
        self.pool.close()
        self.pool = L1Pool(16 * KiB, "LRU", quotas=self.QUOTAS)

    @staticmethod
    def _key(k: int) -> ObjectKey:
        return tkey(k % 4, SALTS[k % 3], f"m{k % 2}")

    @rule(target=PoolMachine.reserved, k=st.integers(0, 11), n=st.sampled_from([16, 256, 700, 1024, 3000]))
    def reserve(self, k: int, n: int) -> L1Object | None:
        try:
            obj = self.pool.reserve(self._key(k), (n,), torch.uint8)
        except CapacityError:
            return None
        self.fill = (self.fill + 1) % 251
        self.pool.view(obj).fill_(self.fill)
        return self._pin(obj)

    @rule(target=PoolMachine.pinned, k=st.integers(0, 11))
    def acquire(self, k: int) -> L1Object | None:
        (obj,) = self.pool.acquire([self._key(k)])
        return None if obj is None else self._pin(obj)

    @invariant()
    def usage_adds_up(self) -> None:
        held = {id(o): o for o in self.pool._index.values()}
        held.update({i: o for i, (o, _) in self.pins.items()})
        want_t: dict[str, list[int]] = {}
        want_m: dict[str, list[int]] = {}
        for o in held.values():
            size = self.pool._alloc.rounded(o.nbytes)
            for table, name in ((want_t, o.key.salt_digest), (want_m, o.key.model_name)):
                entry = table.setdefault(name, [0, 0])
                entry[0] += size
                entry[1] += o.live
        stats = self.pool.stats()
        got_t = {t: [v["bytes"], v["objects"]] for t, v in stats["tenants"].items() if v["bytes"] or v["objects"]}
        got_m = {m: [v["bytes"], v["objects"]] for m, v in stats["models"].items()}
        assert got_t == want_t and got_m == want_m
        assert sum(v[0] for v in got_t.values()) == stats["used_bytes"]
        assert sum(v[1] for v in got_t.values()) == stats["objects"]
        for t, (nbytes, _) in got_t.items():
            quota = self.QUOTAS.quota(t)
            if quota is not None and nbytes > quota:  # over only by objects pinned by operations in flight
                unpinned = [o for o in held.values() if o.key.salt_digest == t and not o.pins]
                assert not unpinned, f"tenant {t} holds {nbytes} over its quota {quota} with unpinned objects"
        for t in {salt_digest(s) for s in SALTS}:  # the per-tenant order holds exactly the tenant's indexed keys
            order = self.pool._usage._orders.get(t)
            keys = {k for k in self.pool._index if k.salt_digest == t}
            if self.QUOTAS.quota(t) is None:
                assert order is None
            else:
                assert set(order.victims() if order else ()) == keys

    def teardown(self) -> None:
        super().teardown()
        assert self.pool.stats()["tenants"].keys() <= set(self.QUOTAS.overrides)
        assert self.pool.stats()["models"] == {}


TenantPoolMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)
test_tenant_pool_state_machine = TenantPoolMachine.TestCase


class TenantPoolS3FIFOMachine(TenantPoolMachine):
    """The same under S3-FIFO, whose per-tenant order reorders itself while it offers victims."""

    def __init__(self) -> None:
        super().__init__()
        self.pool.close()
        self.pool = L1Pool(16 * KiB, "S3-FIFO", quotas=self.QUOTAS)


TenantPoolS3FIFOMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)
test_tenant_pool_state_machine_s3fifo = TenantPoolS3FIFOMachine.TestCase


@given(
    n=st.integers(0, 300),
    actions=st.lists(st.sampled_from(["evict", "skip", "touch"]), max_size=400),
    policy=st.sampled_from(["LRU", "FIFO", "LFU"]),
)
@settings(max_examples=60, deadline=None)
def test_lru_victims_are_read_in_windows_and_offer_each_key_once(n: int, actions: list[str], policy: str) -> None:
    # The walk copies the order a window at a time (not whole per eviction); it must still offer the keys in order,
    # each once, while the owner evicts some, skips (pinned) others and reads some (moved to the back).
    order = create_policy(policy)
    for i in range(n):
        order.insert(i)
    expected = list(range(n))
    offered: list[int] = []
    walk = order.victims()
    for step, key in enumerate(walk):
        offered.append(key)
        action = actions[step] if step < len(actions) else "skip"
        if action == "evict":
            order.remove(key)
        elif action == "touch":  # a read during the walk: of a key offered already, or of one still to come
            order.access(offered[step // 2] if step % 2 else (step * 7) % n)
    assert len(offered) == len(set(offered)) == n
    if "touch" not in actions or policy == "FIFO":
        assert offered == expected


def test_the_ledger_refuses_to_go_negative() -> None:
    ledger = UsageLedger()
    ledger.change("", "m", 10, 1)
    with pytest.raises(RuntimeError, match="negative"):
        ledger.change("", "m", -11, 0)


# -- quotas in the L2 adapters -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_s3() -> Iterator[LocalS3 | None]:
    if not moto_available() or importlib.util.find_spec("obstore") is None:
        yield None
        return
    with LocalS3(bucket="kvtier-tenants") as s3:
        yield s3


def adapter_config(kind: str, tmp_path: Path, s3: LocalS3 | None = None, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"type": kind}
    if kind == "fs":
        base.update(base_path=str(tmp_path), durability="none")
    if kind == "object_store":
        if s3 is None:
            pytest.skip("moto[server] and obstore (the dev and object_store extras) are needed")
        base.update(url=f"s3://kvtier-tenants/{abs(hash(str(tmp_path)))}", options=s3.options())
    return {**base, **extra}


def rec(n: int) -> list[bytes]:
    return [bytes(n)]


@pytest.mark.parametrize("kind", ["fs", "memory", "object_store"])
def test_l2_tenant_quota_evicts_the_tenants_own_records(tmp_path: Path, kind: str, local_s3: LocalS3 | None) -> None:
    a, b = salt_digest(SALTS[1]), salt_digest(SALTS[2])
    config = adapter_config(kind, tmp_path, local_s3, tenant_quota_gb=kib_gb(10), tenant_quotas_gb={b: None})
    adapter = create_l2_adapter(config, "l2_adapters[0]").adapter
    try:
        akeys = [tkey(i, SALTS[1]).to_str() for i in range(6)]
        bkeys = [tkey(100 + i, SALTS[2], "other").to_str() for i in range(5)]
        for ak, bk in zip(akeys, bkeys, strict=False):
            adapter.store_records([ak], [rec(4 * KiB)])
            adapter.store_records([bk], [rec(4 * KiB)])
        adapter.load_records([akeys[3]], [[bytearray(4 * KiB)]])  # a3 is now her most recently used
        adapter.store_records([akeys[5]], [rec(4 * KiB)])  # evicts a4, not a3
        adapter.store_records([akeys[5]], [rec(4 * KiB)])  # a re-store at her quota evicts nothing
        assert adapter.contains(akeys) == [False, False, False, True, False, True]
        assert all(adapter.contains(bkeys)), "bob lost records to alice's quota"
        stats = adapter.stats()
        assert stats["tenants"][a] == {"bytes": 8 * KiB, "objects": 2, "quota_bytes": 10 * KiB}
        assert stats["tenants"][b] == {"bytes": 20 * KiB, "objects": 5, "quota_bytes": None}
        assert stats["models"] == {"m": {"bytes": 8 * KiB, "objects": 2}, "other": {"bytes": 20 * KiB, "objects": 5}}
        assert stats["quota_evictions"] == 4
        with pytest.raises(CapacityError, match="quota"):  # a batch larger than her quota: all or nothing
            adapter.store_records([tkey(50, SALTS[1]).to_str(), tkey(51, SALTS[1]).to_str()], [rec(6 * KiB)] * 2)
        assert adapter.contains(akeys) == [False, False, False, True, False, True]
        adapter.delete(akeys + bkeys)
        assert adapter.stats()["tenants"] == {b: {"bytes": 0, "objects": 0, "quota_bytes": None}}
        assert adapter.stats()["models"] == {}
    finally:
        adapter.close()


_adapter_ops = st.lists(
    st.tuples(
        st.sampled_from(["store", "store", "load", "delete"]),
        st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, 5), st.sampled_from([1, 1000, 3000])), min_size=1, max_size=3
        ),
    ),
    max_size=25,
)


@pytest.mark.parametrize("kind", ["memory", "fs"])
@given(ops=_adapter_ops)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_l2_tenant_usage_matches_the_records_after_any_sequence(kind: str, ops: list[Any]) -> None:
    quotas = {salt_digest(SALTS[1]): kib_gb(5), salt_digest(SALTS[2]): None}
    with tempfile.TemporaryDirectory() as tmp:
        config = adapter_config(kind, Path(tmp), max_capacity_gb=kib_gb(12), tenant_quota_gb=kib_gb(6))
        adapter = create_l2_adapter({**config, "tenant_quotas_gb": quotas}, "l2_adapters[0]").adapter
        try:
            sizes: dict[str, int] = {}  # the model: key -> record size, for the keys the adapter reports held
            for op, items in ops:
                keys = [tkey(i, SALTS[t], f"m{i % 2}").to_str() for t, i, _ in items]
                if op == "store":
                    with contextlib.suppress(CapacityError):
                        adapter.store_records(keys, [rec(n) for _, _, n in items])
                elif op == "load":
                    adapter.load_records(keys, [[bytearray(4000)] for _ in keys])
                else:
                    adapter.delete(keys)
                held = adapter.contains(list(dict.fromkeys(keys + list(sizes))))
                for k, h in zip(dict.fromkeys(keys + list(sizes)), held, strict=True):
                    if h:
                        sizes[k] = len(adapter.read_heads([k], 1 << 20)[0] or b"")
                    else:
                        sizes.pop(k, None)
                stats = adapter.stats()
                want: dict[str, list[int]] = {}
                for k, n in sizes.items():
                    entry = want.setdefault(tenant_of_key_str(k)[0], [0, 0])
                    entry[0] += n
                    entry[1] += 1
                got = {t: [v["bytes"], v["objects"]] for t, v in stats["tenants"].items() if v["objects"]}
                assert got == want
                assert sum(v[0] for v in got.values()) == stats["used_bytes"] <= 12 * KiB
                for t, (nbytes, _) in got.items():
                    quota = TenantQuotas.parse(6 * KiB / GiB, quotas, "a", "b").quota(t)
                    assert quota is None or nbytes <= quota
        finally:
            adapter.close()


def test_fs_tenant_usage_is_exact_under_concurrent_batches(tmp_path: Path) -> None:
    config = adapter_config("fs", tmp_path, max_capacity_gb=kib_gb(64), tenant_quota_gb=kib_gb(20))
    adapter = create_l2_adapter(config, "l2_adapters[0]").adapter
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(60):
                salt = SALTS[(seed + i) % 3]
                ks = [tkey((seed * 7 + i + j) % 9, salt, f"m{j}").to_str() for j in range(2)]
                # Refused when the tenant's other batches in flight hold the rest of its quota: never over it.
                with contextlib.suppress(CapacityError):
                    adapter.store_records(ks, [rec(3 * KiB), rec(2 * KiB)])
                if i % 7 == 0:
                    adapter.delete(ks[:1])
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:1]
        stats = adapter.stats()
        assert sum(v["bytes"] for v in stats["tenants"].values()) == stats["used_bytes"]
        assert sum(v["objects"] for v in stats["tenants"].values()) == stats["records"]
        assert sum(v["bytes"] for v in stats["models"].values()) == stats["used_bytes"]
        assert all(v["bytes"] <= 20 * KiB for v in stats["tenants"].values())
        assert stats["used_bytes"] <= 64 * KiB
    finally:
        adapter.close()


def test_fs_usage_per_tenant_is_rebuilt_at_restart(tmp_path: Path) -> None:
    config = adapter_config("fs", tmp_path, tenant_quota_gb=kib_gb(8))
    with Store(1 / 1024, l2_adapters=[config]) as store:
        for i in range(4):
            store.store([tkey(i, SALTS[1])], [torch.zeros(3000, dtype=torch.uint8)])
        store.flush()
        before = store.stats()["l2"][0]["tenants"]
    with Store(1 / 1024, l2_adapters=[config]) as store:
        after = store.stats()["l2"][0]["tenants"]
        assert after == before and after[salt_digest(SALTS[1])]["objects"] < 4  # the quota held on disk too
        assert after[salt_digest(SALTS[1])]["bytes"] <= 8 * KiB


def test_fs_trims_a_tenant_whose_quota_shrank_at_restart(tmp_path: Path) -> None:
    d = salt_digest(SALTS[1])
    with Store(1 / 1024, l2_adapters=[adapter_config("fs", tmp_path)]) as store:
        for i in range(6):
            store.store([tkey(i, SALTS[1]), tkey(100 + i, SALTS[2])], [torch.zeros(3000, dtype=torch.uint8)] * 2)
        store.flush()
    smaller = adapter_config("fs", tmp_path, tenant_quotas_gb={d: kib_gb(7)})
    with Store(1 / 1024, l2_adapters=[smaller]) as store:
        tenants_ = store.stats()["l2"][0]["tenants"]
        assert tenants_[d]["bytes"] <= 7 * KiB and tenants_[d]["objects"] == 2
        assert tenants_[salt_digest(SALTS[2])]["objects"] == 6, "only the tenant over its quota is trimmed"
        store.clear_l1()
        got = store.retrieve([tkey(i, SALTS[1]) for i in range(6)])
        assert [g is not None for g in got] == [False] * 4 + [True] * 2, "the oldest went first"


def test_object_store_trims_a_tenant_whose_quota_shrank_at_restart(tmp_path: Path, local_s3: LocalS3 | None) -> None:
    d = salt_digest(SALTS[1])
    config = adapter_config("object_store", tmp_path, local_s3)
    adapter = create_l2_adapter(config, "l2_adapters[0]").adapter
    try:
        for i in range(5):
            adapter.store_records([tkey(i, SALTS[1]).to_str(), tkey(100 + i, SALTS[2]).to_str()], [rec(2 * KiB)] * 2)
    finally:
        adapter.close()
    adapter = create_l2_adapter({**config, "tenant_quotas_gb": {d: kib_gb(5)}}, "l2_adapters[0]").adapter
    try:
        assert adapter.contains([tkey(i, SALTS[1]).to_str() for i in range(5)]) == [False] * 3 + [True] * 2
        stats = adapter.stats()
        assert stats["tenants"][d] == {"bytes": 4 * KiB, "objects": 2, "quota_bytes": 5 * KiB}
        assert stats["tenants"][salt_digest(SALTS[2])]["objects"] == 5 and stats["quota_evictions"] == 3
    finally:
        adapter.close()


def test_tenant_of_a_key_string() -> None:
    assert tenant_of_key_str(tkey(3, SALTS[1], "org/model").to_str()) == (salt_digest(SALTS[1]), "org/model")
    assert tenant_of_key_str("not-a-key") == ("", "")


# -- config --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"l1_quota_gb": -1}, "l1_quota_gb"),
        ({"l1_quota_gb": "1"}, "l1_quota_gb"),
        ({"l1_quota_gb": True}, "l1_quota_gb"),
        ({"l1_quota_gb": float("nan")}, "l1_quota_gb"),
        ({"l1_quotas_gb": [1]}, "l1_quotas_gb"),
        ({"l1_quotas_gb": {"0" * 32: -2}}, "l1_quotas_gb"),
        ({"l1_quotas_gb": {"0" * 32: "lots"}}, "l1_quotas_gb"),
    ],
)
def test_bad_quota_arguments_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Store(0.001, **kwargs)


def test_an_override_named_by_a_raw_salt_is_refused_without_echoing_it() -> None:
    salt = "tenant-raw-salt-3b9f0d"
    with pytest.raises(ConfigError, match="salt digest") as info:
        Store(0.001, l1_quotas_gb={salt: 1})
    assert salt not in str(info.value)
    with pytest.raises(ConfigError, match="tenant_quotas_gb") as info:
        create_l2_adapter({"type": "memory", "tenant_quotas_gb": {salt: 1}}, "l2_adapters[0]")
    assert salt not in str(info.value)
    with pytest.raises(ConfigError, match="--l1-quota") as info:
        parse_quota_flag(f"{salt}=1", "--l1-quota")
    assert salt not in str(info.value)


def test_a_shared_object_store_prefix_refuses_tenant_quotas() -> None:
    pytest.importorskip("obstore")
    config = {"type": "object_store", "url": "s3://b/p", "shared": True, "tenant_quota_gb": 1}
    with pytest.raises(ConfigError, match=r"l2_adapters\[0\]\.tenant_quota_gb: not allowed with shared"):
        create_l2_adapter(config, "l2_adapters[0]")


@pytest.mark.parametrize("field", ["tenant_quota_gb", "tenant_quotas_gb"])
def test_redis_refuses_tenant_quotas_at_start_naming_the_field(field: str) -> None:
    value: Any = 1.0 if field == "tenant_quota_gb" else {"0" * 32: 1.0}
    with pytest.raises(ConfigError, match=rf"l2_adapters\[0\]\.{field}: not supported.*maxmemory"):
        create_l2_adapter({"type": "redis", "url": "redis://localhost:6379", field: value}, "l2_adapters[0]")


def test_quota_flags() -> None:
    d = salt_digest(SALTS[1])
    assert parse_quota_flag(f"{d}=2.5", "--l1-quota") == (d, 2.5)
    assert parse_quota_flag(f"{d}=none", "--l1-quota") == (d, None)
    assert parse_quota_flag("=1", "--l1-quota") == ("", 1.0)
    for bad in (d, f"{d}=x", f"{d}=-1", f"{d.upper()}=1"):
        with pytest.raises(ConfigError, match="--l1-quota"):
            parse_quota_flag(bad, "--l1-quota")


def test_server_config_reads_quota_flags_and_file(tmp_path: Path) -> None:
    import argparse

    from kvtier.server.config import ServerConfig, add_arguments, config_from_args

    d = salt_digest(SALTS[1])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--l1-size-gb", "1", "--l1-quota-gb", "0.5", "--l1-quota", f"{d}=2", "--l1-quota", "=none"]
    )
    config = config_from_args(args)
    assert config.store_kwargs()["l1_quota_gb"] == 0.5
    assert config.store_kwargs()["l1_quotas_gb"] == {d: 2.0, "": None}
    assert config.to_json()["l1_quotas_gb"] == {d: 2.0, "": None}  # digests are not secrets
    with pytest.raises(ConfigError, match="l1_quota_gb"):
        ServerConfig.from_dict({"l1_size_gb": 1, "l1_quota_gb": -1})
    with pytest.raises(ConfigError, match="l1_quotas_gb") as info:
        ServerConfig.from_dict({"l1_size_gb": 1, "l1_quotas_gb": {SALTS[1]: 1}})
    assert SALTS[1] not in str(info.value)
    with pytest.raises(ConfigError, match="--l1-quota"):
        config_from_args(parser.parse_args(["--l1-size-gb", "1", "--l1-quota", "1"]))
    config_file = tmp_path / "kvtier.yaml"
    config_file.write_text(f"l1_size_gb: 1\nl1_quotas_gb:\n  {'1' * 32}: 2\n")  # unquoted: YAML reads a number
    with pytest.raises(ConfigError, match="quote it"):
        config_from_args(parser.parse_args(["--config", str(config_file)]))
    config_file.write_text(f"l1_size_gb: 1\nl1_quota_gb: 0.25\nl1_quotas_gb:\n  '{d}': null\n")
    config = config_from_args(parser.parse_args(["--config", str(config_file)]))
    assert (config.l1_quota_gb, config.l1_quotas_gb) == (0.25, {d: None})


def test_digest_helper_reads_the_salt_from_stdin(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(SALTS[1]))
    assert main(["digest"]) == 0
    assert capsys.readouterr().out.strip() == salt_digest(SALTS[1])
    assert main([]) == 2


# -- metrics -------------------------------------------------------------------------------------------------------
def test_tenant_and_model_usage_become_labels_and_many_tenants_are_summed() -> None:
    tenants_ = {format(i, "032x"): {"bytes": 1000 + i, "objects": 1, "quota_bytes": 5000} for i in range(150)}
    stats = {"l1": {"tenants": tenants_, "models": {"org/m": {"bytes": 5, "objects": 1}}}, "l2": []}
    flat = flatten_stats(stats)
    samples = flat["kvtier_store_l1_tenant_bytes"]
    assert len(samples) == MAX_LABELLED + 1
    labelled = {labels["tenant"]: v for labels, v in samples}
    assert labelled[format(149, "032x")] == 1149 and format(0, "032x") not in labelled  # the largest kept
    assert labelled[OTHER] == sum(1000 + i for i in range(50))
    assert len(flat["kvtier_store_l1_tenant_quota_bytes"]) == MAX_LABELLED  # quotas are not summed
    assert flat["kvtier_store_l1_model_objects"] == [({"model": "org/m"}, 1.0)]
    tier = {"type": "fs", "tenants": {"": {"bytes": 7, "objects": 1, "quota_bytes": None}}}
    flat = flatten_stats({"l2": [tier]})
    assert flat["kvtier_store_l2_tenant_bytes"] == [({"index": "0", "type": "fs", "tenant": ""}, 7.0)]
    assert "kvtier_store_l2_tenant_quota_bytes" not in flat  # no quota: no sample
