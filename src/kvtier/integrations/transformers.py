"""HF transformers 5.x reuses prompt KV through kvtier.

After a prefill, the prompt's KV is cut into chunks of ``store.chunk_size`` tokens, each holding every layer in one
tensor ``[2 (K, V), layers, tokens, kv_heads * head_dim]`` (:meth:`kvtier.LayoutDesc.kv_chunk`), and stored under
the keys of its token ids (a rolling prefix hash, so a chunk is only found after the same whole prefix). Before the
next request the longest stored prefix is looked up and rebuilt into a ``DynamicCache``; the model computes only the
rest. At least one token is always computed, since the logits of the last prompt token are needed.

Only models whose every layer keeps full-attention KV of one shape are accepted: a sliding-window, chunked,
KV-sharing or recurrent layer (Gemma 3, Mistral, Qwen2 with ``use_sliding_window``) would need other KV than the
prefix holds, so such models are refused with :class:`UnsupportedModelError` rather than served wrong KV.

Example::

    store = kvtier.Store(l1_size_gb=1)
    kv = TransformersKV(model, store, model_name="smollm2-135m")
    out = kv.generate(input_ids, max_new_tokens=32, do_sample=False)   # stores the prompt's KV
    out = kv.generate(input_ids, max_new_tokens=32, do_sample=False)   # reuses it: out.reused_tokens > 0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from kvtier.errors import ConfigError, MissingDependencyError
from kvtier.types import ObjectKey

try:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs
except ImportError as exc:  # pragma: no cover - the extra is part of `make venv`
    raise MissingDependencyError("kvtier.integrations.transformers", "transformers", extra="transformers") from exc


@runtime_checkable
class KVStore(Protocol):
    """What the integration needs of a store: the embedded :class:`kvtier.Store` and the server's ``Client``.

    ``store`` must copy the tensors before it returns (the integration reuses its staging buffers);
    ``retrieve_into`` fills caller-owned contiguous tensors and returns the number of leading hits.
    """

    @property
    def chunk_size(self) -> int: ...

    def keys_for_tokens(self, model_name: str, token_ids: Any, cache_salt: str = "") -> list[ObjectKey]: ...

    def store(self, keys: Sequence[ObjectKey], tensors: Sequence[torch.Tensor]) -> None: ...

    def lookup(self, keys: Sequence[ObjectKey]) -> int: ...

    def retrieve(self, keys: Sequence[ObjectKey]) -> list[torch.Tensor | None]: ...

    def retrieve_into(self, keys: Sequence[ObjectKey], outs: Sequence[torch.Tensor]) -> int: ...


class UnsupportedModelError(ConfigError):
    """The model's KV cannot be reused safely through chunks (its layers differ, or it is not a decoder)."""


@dataclass(frozen=True)
class KVSpec:
    """Shape of one model's KV: every layer ``[1, kv_heads, seq, head_dim]`` of ``dtype``."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def hidden(self) -> int:
        return self.kv_heads * self.head_dim


def kv_spec(model: Any) -> KVSpec:
    """Check that ``model`` is a decoder whose every layer keeps full-attention KV; return its KV shape.

    Raises :class:`UnsupportedModelError` naming what differs.
    """
    config = model.config.get_text_config(decoder=True)
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{type(model).__name__}: encoder-decoder models are not supported")
    layer_types, _ = get_layer_types_and_kwargs(config)
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise UnsupportedModelError(
            f"{type(model).__name__}: layer types {other} besides full_attention (sliding-window or hybrid "
            "attention): their KV is not the plain prefix KV that kvtier chunks hold, so it is refused"
        )
    probe = DynamicCache(config=model.config)
    kinds = sorted({type(layer).__name__ for layer in probe.layers if type(layer) is not DynamicLayer})
    if kinds:
        raise UnsupportedModelError(f"{type(model).__name__}: cache layers {kinds} are not plain DynamicLayers")
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    dtype = next(model.parameters()).dtype
    return KVSpec(int(config.num_hidden_layers), kv_heads, head_dim, dtype)


def _input_ids(input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ConfigError(f"input_ids: only batch size 1 is supported, got shape {list(ids.shape)}")
    if ids.shape[1] < 1:
        raise ConfigError("input_ids: the prompt is empty")
    return ids


@dataclass
class Prefix:
    """A rebuilt cache: ``cache`` holds the KV of the first ``tokens`` prompt tokens (``chunks`` chunks)."""

    cache: Any
    tokens: int
    chunks: int
    keys: list[ObjectKey]


@dataclass
class Result:
    """What :meth:`TransformersKV.forward` / :meth:`TransformersKV.generate` return."""

    output: Any  # the model's output (ModelOutput / GenerateDecoderOnlyOutput)
    reused_tokens: int  # prompt tokens whose KV came from the store
    stored_chunks: int  # chunks newly stored after this request


class TransformersKV:
    """Prompt KV reuse for one HF transformers model through a :class:`KVStore`.

    ``model_name`` names the weights in every key: two models must never share one (KV of other weights would be
    wrong KV); ``cache_salt`` separates tenants. Batch size 1.
    """

    def __init__(self, model: Any, store: KVStore, model_name: str, cache_salt: str = "") -> None:
        ObjectKey(model_name, "0", 0, cache_salt)  # validates both names now, with a ConfigError naming the field
        self.model = model
        self.store = store
        self.model_name = model_name
        self.cache_salt = cache_salt
        self.spec = kv_spec(model)
        self.chunk_size = int(store.chunk_size)
        # Staging chunks [n, 2, layers, chunk_size, hidden], reused across requests and grown as needed: no
        # allocation per chunk on the store or retrieve path.
        self._staging = torch.empty(0, dtype=self.spec.dtype)

    def _stage(self, n: int) -> torch.Tensor:
        s = self.spec
        shape = (n, 2, s.layers, self.chunk_size, s.hidden)
        size = n * 2 * s.layers * self.chunk_size * s.hidden
        if self._staging.numel() < size:
            self._staging = torch.empty(size, dtype=s.dtype)
        return self._staging[:size].view(shape)

    def keys(self, input_ids: torch.Tensor | Sequence[int]) -> list[ObjectKey]:
        """The chunk keys of a prompt (full chunks only)."""
        return self.store.keys_for_tokens(self.model_name, _input_ids(input_ids)[0], self.cache_salt)

    # -- DynamicCache <-> chunks ----------------------------------------------------------------------------
    def cache_to_chunks(self, cache: Any, first: int, count: int) -> torch.Tensor:
        """Chunks ``first .. first+count`` of ``cache`` in the chunk layout, in the (reused) staging buffer."""
        s, t = self.spec, self.chunk_size
        layers = _layers(cache, s.layers)
        out = self._stage(count)
        out6 = out.view(count, 2, s.layers, t, s.kv_heads, s.head_dim)
        start, end = first * t, (first + count) * t
        for i, layer in enumerate(layers):
            for kv, src in enumerate((layer.keys, layer.values)):
                if src.dim() != 4 or src.shape[0] != 1 or src.shape[1] != s.kv_heads or src.shape[3] != s.head_dim:
                    raise UnsupportedModelError(
                        f"layer {i}: KV of shape {list(src.shape)}, expected [1, {s.kv_heads}, seq, {s.head_dim}]"
                    )
                if src.shape[2] < end:
                    raise ValueError(f"layer {i} holds {src.shape[2]} tokens, {end} needed")
                # [1, H, n*T, D] -> [n, T, H, D]: one strided copy per layer into the chunk layout.
                block = src[0, :, start:end, :].reshape(s.kv_heads, count, t, s.head_dim).permute(1, 2, 0, 3)
                out6[:, kv, i].copy_(block)
        return out

    def chunks_to_cache(self, chunks: torch.Tensor) -> Any:
        """A DynamicCache holding the KV of ``chunks`` [n, 2, layers, chunk_size, hidden] (copied once)."""
        s, t = self.spec, self.chunk_size
        n = chunks.shape[0]
        # One allocation for the request: [2, layers, 1, H, n*T, D]; each layer's K and V are contiguous views.
        kv = torch.empty((2, s.layers, 1, s.kv_heads, n * t, s.head_dim), dtype=s.dtype)
        kv.view(2, s.layers, s.kv_heads, n, t, s.head_dim).copy_(
            chunks.view(n, 2, s.layers, t, s.kv_heads, s.head_dim).permute(1, 2, 4, 0, 3, 5)
        )
        cache = DynamicCache(config=self.model.config)
        for i, layer in enumerate(_layers(cache, s.layers)):
            # Set the tensors directly instead of `update()`, whose concatenation with an empty tensor would copy
            # them once more; the next forward's update concatenates onto them as usual.
            layer.lazy_initialization(kv[0, i], kv[1, i])
            layer.keys, layer.values = kv[0, i], kv[1, i]
        return cache

    # -- the request path -------------------------------------------------------------------------------------
    def prepare(self, input_ids: torch.Tensor | Sequence[int]) -> Prefix:
        """Look up the longest stored prefix of the prompt and rebuild it into a DynamicCache (empty on a miss).

        The last prompt token is never taken from the store: its logits have to be computed.
        """
        ids = _input_ids(input_ids)
        keys = self.store.keys_for_tokens(self.model_name, ids[0], self.cache_salt)
        usable = min(len(keys), (ids.shape[1] - 1) // self.chunk_size)
        n = self.store.lookup(keys[:usable]) if usable else 0
        if n:
            staging = self._stage(n)
            # A chunk may be evicted between lookup and retrieve: only the leading hits count.
            n = self.store.retrieve_into(keys[:n], list(staging.unbind(0)))
        if not n:
            return Prefix(DynamicCache(config=self.model.config), 0, 0, keys)
        return Prefix(self.chunks_to_cache(self._stage(n)), n * self.chunk_size, n, keys)

    def save(self, keys: Sequence[ObjectKey], cache: Any, skip: int = 0) -> int:
        """Store the chunks ``skip..`` of ``keys`` that ``cache`` fully holds; return how many were stored."""
        held = int(_layers(cache, self.spec.layers)[0].get_seq_length()) // self.chunk_size
        count = min(len(keys), held) - skip
        if count <= 0:
            return 0
        self.store.store(list(keys[skip : skip + count]), list(self.cache_to_chunks(cache, skip, count).unbind(0)))
        return count

    def forward(self, input_ids: torch.Tensor | Sequence[int], **kwargs: Any) -> Result:
        """One forward over the prompt reusing its stored prefix; ``output.logits`` covers only the tokens computed
        (the last row is the last prompt token's). The prompt's new chunks are stored."""
        ids = _input_ids(input_ids)
        prefix = self.prepare(ids)
        with torch.no_grad():
            output = self.model(ids[:, prefix.tokens :], past_key_values=prefix.cache, use_cache=True, **kwargs)
        stored = self.save(prefix.keys, output.past_key_values, skip=prefix.chunks)
        return Result(output, prefix.tokens, stored)

    def generate(self, input_ids: torch.Tensor | Sequence[int], **kwargs: Any) -> Result:
        """``model.generate`` reusing the prompt's stored prefix; stores the prompt's new chunks afterwards.

        ``output.sequences`` holds the prompt and the generated tokens, as with a plain ``generate``.
        """
        ids = _input_ids(input_ids)
        mask = kwargs.pop("attention_mask", None)
        if mask is not None and not bool(torch.as_tensor(mask).all()):
            raise ConfigError("attention_mask: padding is not supported (batch size 1, every token attended)")
        prefix = self.prepare(ids)
        output = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=prefix.cache,
            return_dict_in_generate=True,
            use_cache=True,
            **kwargs,
        )
        stored = self.save(prefix.keys, output.past_key_values, skip=prefix.chunks)
        return Result(output, prefix.tokens, stored)


def _layers(cache: Any, expected: int) -> list[Any]:
    if not isinstance(cache, DynamicCache):
        raise ConfigError(f"past_key_values: expected a DynamicCache, got {type(cache).__name__}")
    layers = list(cache.layers)
    if len(layers) != expected or any(type(layer) is not DynamicLayer for layer in layers):
        raise UnsupportedModelError(f"cache has {len(layers)} layers of kinds other than {expected} DynamicLayers")
    return layers
