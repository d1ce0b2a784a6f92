"""aesgcm: authenticated encryption of a payload with AES-128-GCM or AES-256-GCM.

``{"type": "aesgcm", "key_file": "/etc/kvtier/key"}`` or ``{"type": "aesgcm", "key_env": "KVTIER_KEY"}``,
optionally ``"key_bits": 128 | 256`` (default: the length of the key given).

* The key never appears in the config (which is hashed into every record and printed in logs): it is read from
  a file (32 or 64 hex digits, or 16 or 32 raw bytes) or an environment variable (hex) when the serde is built.
* The configured key is a master key: records are encrypted with a key derived by HKDF-SHA256 with the
  ``cache_salt`` in ``info``, so two tenants' records never share a key, even with the empty salt.
* Each record gets a fresh random 96-bit nonce. Layout: ``nonce (12) | ciphertext (n) | tag (16)``.
* Encryption writes into the caller's buffer (``AESGCM.encrypt_into``), decryption into the destination
  (``decrypt_into``): the allocating ``encrypt`` is ~7x slower here.
* A wrong key, another salt's key, or any altered byte fails the tag check: :class:`IntegrityError` (a miss);
  nothing is written to the destination then.

**How the salt reaches the serde.** The serde contract has no salt argument, and it stays that way. A processor
built from a config encrypts for the empty salt; the storage layer asks for the processor of a salt with
:func:`for_cache_salt` (``for_cache_salt(processor, "tenant-a")``), which returns a processor of the same
config whose aesgcm stage (alone or anywhere in a chain) uses that salt's derived key. Processors that hold no
aesgcm stage come back unchanged, so a caller may call it for every serde. Callers cache the result per salt.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kvtier.config import ConfigReader
from kvtier.errors import ConfigError, IntegrityError
from kvtier.serde.base import BytesDeserializer, BytesSerializer, as_byte_view, check_dst_capacity
from kvtier.serde.chain import ChainDeserializer, ChainSerializer, ScratchPool
from kvtier.serde.processor import AsyncSerdeProcessor
from kvtier.types import LayoutDesc

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
_HKDF_INFO = b"kvtier aesgcm v1 cache_salt="
_HEX = re.compile(rb"\s*([0-9a-fA-F]{32}|[0-9a-fA-F]{64})\s*")


def _parse_key(raw: bytes, where: str) -> bytes:
    match = _HEX.fullmatch(raw)
    if match:
        return bytes.fromhex(match.group(1).decode())
    if len(raw) in (16, 32):
        return raw
    raise ConfigError(f"{where}: expected a 128- or 256-bit key as 32 or 64 hex digits (or 16 or 32 raw bytes)")


def load_master_key(reader: ConfigReader) -> bytes:
    """The master key named by ``key_file`` or ``key_env`` (exactly one of them)."""
    key_file = reader.string("key_file", None)
    key_env = reader.string("key_env", None)
    if reader.has("key") or reader.has("key_hex"):
        raise ConfigError(f"{reader.where}: a key must not be written in the config; use key_file or key_env")
    if (key_file is None) == (key_env is None):
        raise ConfigError(f"{reader.where}: give exactly one of key_file or key_env")
    if key_file is not None:
        try:
            raw = Path(key_file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{reader.where}.key_file: cannot read {key_file!r}: {exc.strerror}") from exc
        return _parse_key(raw, f"{reader.where}.key_file")
    value = os.environ.get(key_env)
    if value is None:
        raise ConfigError(f"{reader.where}.key_env: environment variable {key_env!r} is not set")
    return _parse_key(value.encode(), f"{reader.where}.key_env")


def derive_key(master: bytes, cache_salt: str) -> bytes:
    """The record key of one ``cache_salt``: HKDF-SHA256 of the master key, the salt in ``info``."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=len(master), salt=None, info=_HKDF_INFO + cache_salt.encode())
    return hkdf.derive(master)


class AesGcmSerializer(BytesSerializer):
    """Encrypts into ``dst``: a random nonce, then ciphertext and tag written by ``encrypt_into``."""

    def __init__(self, master: bytes, cache_salt: str = "") -> None:
        self._master = master
        self.cache_salt = cache_salt
        self._aead = AESGCM(derive_key(master, cache_salt))

    def for_cache_salt(self, cache_salt: str) -> AesGcmSerializer:
        return AesGcmSerializer(self._master, cache_salt)

    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        return layout_desc.nbytes + OVERHEAD

    def serialize(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        data = as_byte_view(src)
        n = data.numel()
        check_dst_capacity(dst, n + OVERHEAD)
        out = dst.numpy()
        nonce = os.urandom(NONCE_SIZE)
        out[:NONCE_SIZE] = np.frombuffer(nonce, dtype=np.uint8)
        self._aead.encrypt_into(nonce, data.numpy().data, None, out[NONCE_SIZE : n + OVERHEAD].data)
        return n + OVERHEAD


class AesGcmDeserializer(BytesDeserializer):
    """Checks the tag and decrypts into ``dst``; a failed check raises IntegrityError."""

    def __init__(self, master: bytes, cache_salt: str = "") -> None:
        self._master = master
        self.cache_salt = cache_salt
        self._aead = AESGCM(derive_key(master, cache_salt))

    def for_cache_salt(self, cache_salt: str) -> AesGcmDeserializer:
        return AesGcmDeserializer(self._master, cache_salt)

    def decoded_size(self, src: torch.Tensor) -> int:
        if src.numel() < OVERHEAD:
            raise IntegrityError(f"aesgcm payload of {src.numel()} bytes is shorter than nonce and tag")
        return src.numel() - OVERHEAD

    def deserialize(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        n = self.decoded_size(src)
        out = as_byte_view(dst)
        if out.numel() != n:
            raise IntegrityError(f"aesgcm payload holds {n} bytes, the destination {out.numel()}")
        data = src.numpy()
        nonce = bytes(data[:NONCE_SIZE])
        try:
            self._aead.decrypt_into(nonce, data[NONCE_SIZE:].data, None, out.numpy().data)
        except InvalidTag as exc:
            raise IntegrityError(
                "aesgcm: authentication failed (wrong key or salt, or the record was altered)"
            ) from exc


def aesgcm_factory(config: dict[str, Any]) -> AsyncSerdeProcessor:
    """``{"type": "aesgcm", "key_file": PATH}`` or ``{"type": "aesgcm", "key_env": NAME}``, ``key_bits``."""
    reader = ConfigReader(config, "serde 'aesgcm'")
    master = load_master_key(reader)
    bits = reader.integer("key_bits", len(master) * 8)
    if bits not in (128, 256):
        raise ConfigError(f"{reader.where}.key_bits: expected 128 or 256, got {bits!r}")
    if bits != len(master) * 8:
        raise ConfigError(f"{reader.where}.key_bits: {bits} given, but the key has {len(master) * 8} bits")
    reader.finish()
    return AsyncSerdeProcessor(AesGcmSerializer(master), AesGcmDeserializer(master))


def for_cache_salt(processor: AsyncSerdeProcessor, cache_salt: str) -> AsyncSerdeProcessor:
    """The processor of ``processor``'s config for one ``cache_salt``: its aesgcm stages use that salt's key.

    Returns ``processor`` itself when it has no salt-dependent stage. The new processor has the same config,
    identity and ``max_workers``, and its own (lazily started) thread pool.
    """
    ser, deser = processor.serializer, processor.deserializer
    if isinstance(ser, ChainSerializer) and isinstance(deser, ChainDeserializer):
        if not any(isinstance(s, AesGcmSerializer) for s in ser.stages):
            return processor
        scratch = ScratchPool()
        new_ser: Any = ChainSerializer([_salted(s, cache_salt) for s in ser.stages], scratch)
        new_deser: Any = ChainDeserializer([_salted(d, cache_salt) for d in deser.stages], scratch)
    elif isinstance(ser, AesGcmSerializer) and isinstance(deser, AesGcmDeserializer):
        new_ser, new_deser = ser.for_cache_salt(cache_salt), deser.for_cache_salt(cache_salt)
    else:
        return processor
    salted = AsyncSerdeProcessor(new_ser, new_deser, max_workers=processor.max_workers)
    salted.config = processor.config
    return salted


def _salted(stage: Any, cache_salt: str) -> Any:
    if isinstance(stage, AesGcmSerializer | AesGcmDeserializer):
        return stage.for_cache_salt(cache_salt)
    return stage
