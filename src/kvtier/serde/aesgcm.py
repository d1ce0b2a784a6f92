"""aesgcm: authenticated encryption of a payload with AES-128-GCM or AES-256-GCM, bound to its record.

``{"type": "aesgcm", "key_file": "/etc/kvtier/key"}`` or ``{"type": "aesgcm", "key_env": "KVTIER_KEY"}``,
optionally ``"key_bits": 128 | 256`` (default: the length of the key given).

* The key never appears in the config (which is hashed into every record and printed in logs): it is read from
  a file (32 or 64 hex digits, or 16 or 32 raw bytes) or an environment variable (hex) when the serde is built.
* The configured key is a master key: each record is encrypted with the key derived by HKDF-SHA256 with its
  record's ``cache_salt`` in ``info`` (:func:`derive_key`), so two tenants' records never share a key.
* The record's associated data (the header fields fixed before encryption: key, layout, serde identity) is the
  AEAD associated data, so a record moved or relabelled under another key, salt or layout fails authentication
  even when whoever moved it recomputed the record's (unkeyed) checksum.
* Both come from the :class:`~kvtier.serde.base.RecordContext` the pipeline hands this stage
  (``takes_context``); used directly, without a context, it encrypts for the empty salt with no associated data.
* Each record gets a fresh random 96-bit nonce. Layout: ``nonce (12) | ciphertext (n) | tag (16)``.
* Encryption writes into the caller's buffer (``AESGCM.encrypt_into``), decryption into the destination
  (``decrypt_into``): the allocating ``encrypt`` is ~7x slower here.
* A failed tag check (another deployment's key, another salt, a relabelled record) raises
  :class:`~kvtier.errors.ForeignRecordError`: a miss that the tier leaves in place, since a deployment with
  another key must not delete records it cannot read. The destination is zeroed then (``decrypt_into``
  writes before it checks the tag): unauthenticated bytes never reach a caller.
* The pipeline identity carries a fingerprint of the master key (keyed BLAKE3 with a fixed label, 64 bits:
  it tells keys apart and reveals nothing of them), never where the key lives: moving the key file keeps the
  records readable, and another key makes them foreign before any decryption is tried.

Key material, key paths and salts are never logged, counted or put into an error message.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kvtier.config import ConfigReader
from kvtier.errors import ConfigError, ForeignRecordError, IntegrityError
from kvtier.serde.base import BytesBytesStage, RecordContext, as_byte_view, check_dst_capacity
from kvtier.serde.processor import AsyncSerdeProcessor
from kvtier.types import LayoutDesc

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
_HKDF_INFO = b"kvtier aesgcm v1 cache_salt="
_FINGERPRINT_LABEL = "kvtier 2026 aesgcm master key fingerprint v1"
_LOCATION = ("key_file", "key_env", "key_bits")  # where the key is (and its length): the fingerprint says which
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
            # the path is left out: where a key lives is not for logs (the user knows the value they gave)
            raise ConfigError(f"{reader.where}.key_file: cannot read the key file: {exc.strerror}") from None
        return _parse_key(raw, f"{reader.where}.key_file")
    value = os.environ.get(key_env)
    if value is None:
        raise ConfigError(f"{reader.where}.key_env: environment variable {key_env!r} is not set")
    return _parse_key(value.encode(), f"{reader.where}.key_env")


def _salt_bytes(cache_salt: str) -> bytes:
    # any str is a salt, lone surrogates included (an engine may hand us one): never a UnicodeEncodeError
    return cache_salt.encode("utf-8", "surrogatepass")


def derive_key(master: bytes, cache_salt: str) -> bytes:
    """The record key of one ``cache_salt``: HKDF-SHA256 of the master key, the salt in ``info``."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=len(master), salt=None, info=_HKDF_INFO + _salt_bytes(cache_salt))
    return hkdf.derive(master)


#: derived-key cache size: one AESGCM object per recently seen salt (HKDF costs tens of microseconds)
_KEY_CACHE = 4096


def key_fingerprint(master: bytes) -> str:
    """16 hex digits that name ``master`` without revealing it: BLAKE3 in key-derivation mode, fixed label."""
    return blake3.blake3(master, derive_key_context=_FINGERPRINT_LABEL).hexdigest(length=8)


class AesGcmStage(BytesBytesStage):
    """Encrypts into ``dst`` (random nonce, then ciphertext and tag) and checks and decrypts into ``dst``, with
    the key of the record's salt and the record's associated data (see the module docstring)."""

    name = "aesgcm"
    takes_context = True

    def __init__(self, master: bytes) -> None:
        if len(master) not in (16, 32):
            raise ConfigError("aesgcm: the key must be 128 or 256 bits")
        self._master = master
        self._fingerprint = key_fingerprint(master)
        self._aeads: OrderedDict[str, AESGCM] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return f"AesGcmStage(key_fingerprint={self._fingerprint})"

    def get_config(self) -> dict[str, Any]:
        return {"type": self.name, "key_fingerprint": self._fingerprint}

    def identity_config(self, config: dict[str, Any] | None) -> dict[str, Any] | None:
        # Which key, not where it lives: the location fields give way to the fingerprint.
        base = self.get_config() if config is None else {k: v for k, v in config.items() if k not in _LOCATION}
        base = {**base, "key_fingerprint": self._fingerprint}
        return super().identity_config(base)

    def _aead(self, context: RecordContext | None) -> AESGCM:
        salt = "" if context is None else context.cache_salt
        with self._lock:
            aead = self._aeads.get(salt)
            if aead is not None:
                self._aeads.move_to_end(salt)
                return aead
        aead = AESGCM(derive_key(self._master, salt))
        with self._lock:
            self._aeads[salt] = aead
            if len(self._aeads) > _KEY_CACHE:
                self._aeads.popitem(last=False)
        return aead

    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        return layout_desc.nbytes + OVERHEAD

    def serialize(self, src: torch.Tensor, dst: torch.Tensor, context: RecordContext | None = None) -> int:
        data = as_byte_view(src)
        n = data.numel()
        check_dst_capacity(dst, n + OVERHEAD)
        out = dst.numpy()
        nonce = os.urandom(NONCE_SIZE)
        out[:NONCE_SIZE] = np.frombuffer(nonce, dtype=np.uint8)
        aad = None if context is None else context.associated_data
        self._aead(context).encrypt_into(nonce, data.numpy().data, aad, out[NONCE_SIZE : n + OVERHEAD].data)
        return n + OVERHEAD

    def decoded_size(self, src: torch.Tensor) -> int:
        if src.numel() < OVERHEAD:
            raise IntegrityError(f"aesgcm payload of {src.numel()} bytes is shorter than nonce and tag")
        return src.numel() - OVERHEAD

    def deserialize(self, src: torch.Tensor, dst: torch.Tensor, context: RecordContext | None = None) -> None:
        n = self.decoded_size(src)
        out = as_byte_view(dst)
        if out.numel() != n:
            raise IntegrityError(f"aesgcm payload holds {n} bytes, the destination {out.numel()}")
        data = src.numpy()
        nonce = bytes(data[:NONCE_SIZE])
        aad = None if context is None else context.associated_data
        try:
            self._aead(context).decrypt_into(nonce, data[NONCE_SIZE:].data, aad, out.numpy().data)
        except InvalidTag as exc:
            # decrypt_into writes the (unauthenticated) plaintext before it checks the tag: wipe it, so that no
            # caller can ever read bytes that failed authentication
            out.zero_()
            raise ForeignRecordError(
                "aesgcm: authentication failed (another key or salt, a record relabelled under another header, "
                "or altered bytes); left in place"
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
    stage = AesGcmStage(master)
    return AsyncSerdeProcessor(stage, stage)
