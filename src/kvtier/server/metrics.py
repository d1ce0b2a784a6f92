"""Prometheus metrics of the server, on a registry of its own (not the process-global one).

Two sources: counters and histograms the request loop updates (requests by op and outcome, latency by op, bytes
in and out by path), and a collector that reads ``Store.stats()`` at scrape time and exposes every numeric leaf
as ``kvtier_store_<path>`` (a list, such as the L2 tiers, becomes ``index`` and ``type`` labels). Reading at
scrape time keeps the hot path free of metric bookkeeping for the Store's own counters.

Usage per tenant and per model (``tenants`` and ``models`` mappings in the stats) becomes a ``tenant`` label (the
salt digest, never the salt; ``""`` for requests without one) or a ``model`` label:
``kvtier_store_l1_tenant_bytes{tenant="..."}``, ``kvtier_store_l1_model_objects{model="..."}``. To bound the
number of series a scrape returns, only the :data:`MAX_LABELLED` largest by bytes get their own label; the rest
are summed under ``tenant="_other"`` (``model="_other"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvtier.config import scrub

_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")
# Leaves whose names say they only grow are exposed as counters; everything else is a gauge.
_COUNTER_SUFFIXES = (
    "hits",
    "misses",
    "evictions",
    "dropped",
    "errors",
    "stored",
    "loaded",
    "failed",
    "failures",
    "refused",
    "written",
    "prefetched",
    "skipped",
    "admitted",
    "total",
)


def _metric_name(path: list[str]) -> str:
    return "kvtier_store_" + "_".join(_NAME_RE.sub("_", p).strip("_").lower() for p in path if p)


#: Mappings of the stats whose keys become a label (key -> (label name, metric path segment)).
_LABELLED = {"tenants": ("tenant", "tenant"), "models": ("model", "model")}
#: The most entries of such a mapping exposed with their own label; the rest are summed under ``_other``.
MAX_LABELLED = 100
OTHER = "_other"


def _top_entries(entries: dict[str, Any]) -> dict[str, Any]:
    """At most :data:`MAX_LABELLED` entries, the largest by bytes, and the sum of the rest's numbers as ``_other``
    (quotas are not summed: a sum of quotas means nothing)."""
    if len(entries) <= MAX_LABELLED:
        return entries
    ranked = sorted(entries.items(), key=lambda kv: -(kv[1].get("bytes") or 0) if isinstance(kv[1], dict) else 0)
    top = dict(ranked[:MAX_LABELLED])
    rest: dict[str, float] = {}
    for _, value in ranked[MAX_LABELLED:]:
        if isinstance(value, dict):
            for field, number in value.items():
                if field != "quota_bytes" and isinstance(number, int | float) and not isinstance(number, bool):
                    rest[field] = rest.get(field, 0) + number
    top[OTHER] = rest
    return top


def flatten_stats(stats: Any) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every numeric leaf of a stats document: metric name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}

    def walk(node: Any, path: list[str], labels: dict[str, str]) -> None:
        if isinstance(node, (bool, int | float)):
            out.setdefault(_metric_name(path), []).append((labels, float(node)))
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in _LABELLED and isinstance(value, dict):
                    label, segment = _LABELLED[key]
                    for name, entry in _top_entries(value).items():
                        walk(entry, [*path, segment], {**labels, label: str(name)})
                    continue
                walk(value, [*path, str(key)], labels)
        elif isinstance(node, list | tuple):
            # A list of tiers: each becomes a label set (its position, and its type when it names one).
            for i, value in enumerate(node):
                item = {**labels, f"index{len(labels) or ''}": str(i)}
                if isinstance(value, dict) and isinstance(value.get("type"), str):
                    item["type"] = value["type"]
                walk(value, path, item)

    walk(stats, [], {})
    return out


class StoreStatsCollector(Collector):
    """Exposes ``stats()`` of the Store at every scrape."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            flat = flatten_stats(self._stats())
        except Exception:  # a scrape must never fail because a tier's stats did; the up gauge says so
            yield GaugeMetricFamily("kvtier_store_stats_up", "1 when Store.stats() answered", value=0.0)
            return
        yield GaugeMetricFamily("kvtier_store_stats_up", "1 when Store.stats() answered", value=1.0)
        for name, samples in sorted(flat.items()):
            label_names = sorted(samples[0][0])
            is_counter = name.endswith(_COUNTER_SUFFIXES)
            family: CounterMetricFamily | GaugeMetricFamily
            if is_counter:
                family = CounterMetricFamily(name.removesuffix("_total"), f"Store.stats() {name}", labels=label_names)
            else:
                family = GaugeMetricFamily(name, f"Store.stats() {name}", labels=label_names)
            for labels, value in samples:
                if sorted(labels) != label_names:
                    continue  # a leaf at the same path with another label set: not expressible in one family
                family.add_metric([labels[k] for k in label_names], value)
            yield family


class ServerMetrics:
    """The server's own metrics; ``render()`` is the ``/metrics`` body."""

    def __init__(
        self, stats: Callable[[], dict[str, Any]], regions: Callable[[], int], secrets: Sequence[str] = ()
    ) -> None:
        self.secrets = tuple(secrets)
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kvtier_requests", "Requests served, by op and outcome", ["op", "outcome"], registry=self.registry
        )
        self.latency = Histogram(
            "kvtier_request_seconds",
            "Time to serve a request, by op",
            ["op"],
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0),
            registry=self.registry,
        )
        self.bytes = Counter(
            "kvtier_data_bytes",
            "Tensor bytes moved, by direction (in: stored, out: retrieved) and path (shm or frames)",
            ["direction", "path"],
            registry=self.registry,
        )
        self.inflight = Gauge("kvtier_requests_in_flight", "Requests queued or being served", registry=self.registry)
        regions_gauge = Gauge(
            "kvtier_shm_regions", "Client shared-memory regions mapped by the server", registry=self.registry
        )
        regions_gauge.set_function(lambda: float(regions()))
        self.registry.register(StoreStatsCollector(stats))

    def observe(self, op: str, seconds: float, outcome: str) -> None:
        self.requests.labels(op, outcome).inc()
        self.latency.labels(op).observe(seconds)

    def render(self) -> bytes:
        """The ``/metrics`` body; label values (adapter types, ...) scrubbed of the config's secrets."""
        body = bytes(generate_latest(self.registry))
        return scrub(body.decode(), self.secrets).encode() if self.secrets else body
