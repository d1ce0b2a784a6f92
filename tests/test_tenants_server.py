"""Per-tenant quotas through a real ``kvtier server`` subprocess: one salt floods the server with one-shot chunks
while another salt keeps reusing its working set. With ``--l1-quota-gb`` the second salt's hit rate stays within 5
points of its rate without the flood; without a quota the flood evicts it (so the test can tell). Usage per tenant
is in ``/stats`` and ``/metrics`` under salt digests, and no salt appears there or in the server's log."""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterator

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvtier import ObjectKey
from kvtier.client import Client
from kvtier.server.process import ServerProcess
from kvtier.types import salt_digest

MiB_GB = 1 / 1024  # one MiB in GiB
ELEMS = 4096  # float32: 16 KiB chunks
WORKING_SET = 64  # the victim's chunks: 1 MiB
ROUNDS = 40
PER_ROUND = 16  # victim requests per round (a quarter of its working set)
FLOOD_PER_ROUND = 64  # one-shot chunks the flooder stores per round: 1 MiB
L1_MB = 4
QUOTA_MB = 1.5

VICTIM, VICTIM_BASELINE, FLOOD = (f"salt-{name}-{secrets.token_hex(8)}" for name in ("victim", "baseline", "flood"))


def server_args(quota: bool) -> list[str]:
    args = ["--l1-size-gb", str(L1_MB * MiB_GB), "--log-level", "info", "--log-format", "text"]
    return [*args, "--l1-quota-gb", str(QUOTA_MB * MiB_GB)] if quota else args


@pytest.fixture(scope="module")
def quota_server() -> Iterator[ServerProcess]:
    with ServerProcess(server_args(quota=True)) as s:
        yield s


def victim_hit_rate(client: Client, salt: str, flood_salt: str | None, seed: int = 7) -> float:
    """The victim's L1 hit rate (%) over a fixed request sequence: each round it asks for a quarter of its working
    set (storing what missed), then the flooder, if any, stores chunks never asked for again."""
    rng = random.Random(seed)
    value = torch.zeros(ELEMS)
    hits = total = 0
    flooded = 0
    for _ in range(ROUNDS):
        keys = [ObjectKey("victim", format(i + 1, "x"), 0, salt) for i in rng.sample(range(WORKING_SET), PER_ROUND)]
        # One key per request: a retrieve answers the leading hits of a batch, and these keys are no prefix.
        missed = [k for k in keys if client.retrieve([k])[0] is None]
        hits += len(keys) - len(missed)
        total += len(keys)
        if missed:
            client.store(missed, [value] * len(missed))
        if flood_salt is not None:
            fkeys = [ObjectKey("flood", format(flooded + j + 1, "x"), 0, flood_salt) for j in range(FLOOD_PER_ROUND)]
            flooded += FLOOD_PER_ROUND
            client.store(fkeys, [value] * len(fkeys))
    return 100.0 * hits / total


def test_a_quota_holds_under_a_flood_and_the_other_salt_keeps_its_hit_rate(quota_server: ServerProcess) -> None:
    with Client(quota_server.address, timeout_s=30) as client:
        baseline = victim_hit_rate(client, VICTIM_BASELINE, None)
        flooded = victim_hit_rate(client, VICTIM, FLOOD)
    with ServerProcess(server_args(quota=False)) as plain, Client(plain.address, timeout_s=30) as client:
        unprotected = victim_hit_rate(client, VICTIM, FLOOD)
    print(
        f"victim hit rate: {baseline:.1f} % alone, {flooded:.1f} % under the flood with quotas, "
        f"{unprotected:.1f} % under the flood without"
    )
    assert flooded >= baseline - 5, (baseline, flooded)
    assert unprotected < baseline - 20, "without a quota the flood should evict the victim: the test would not tell"

    stats = quota_server.get("/stats")
    tenants = stats["store"]["l1"]["tenants"]
    quota = int(QUOTA_MB * (1 << 20))
    assert tenants[salt_digest(FLOOD)]["bytes"] <= quota
    assert tenants[salt_digest(FLOOD)]["quota_bytes"] == quota
    assert tenants[salt_digest(VICTIM)]["objects"] == WORKING_SET  # none of the victim's chunks was evicted


def test_usage_per_tenant_in_stats_and_metrics_by_digest_and_no_salt_anywhere(quota_server: ServerProcess) -> None:
    salt = f"salt-probe-{secrets.token_hex(8)}"
    with Client(quota_server.address, timeout_s=30) as client:
        keys = [ObjectKey("org/probe", format(i + 1, "x"), 0, salt) for i in range(3)]
        client.store(keys, [torch.zeros(ELEMS)] * 3)
    stats_text = quota_server.get("/stats")
    metrics = quota_server.get("/metrics")
    flat = str(stats_text)
    digest = salt_digest(salt)
    assert digest in flat and digest in metrics
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    tenant_bytes = {s.labels["tenant"]: s.value for s in families["kvtier_store_l1_tenant_bytes"].samples}
    assert tenant_bytes[digest] == 3 * ELEMS * 4
    models = {s.labels["model"]: s.value for s in families["kvtier_store_l1_model_objects"].samples}
    assert models["org/probe"] == 3
    log = quota_server.stderr()
    for secret in (salt, VICTIM, VICTIM_BASELINE, FLOOD):
        assert secret not in flat and secret not in metrics and secret not in log
