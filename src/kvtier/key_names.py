"""The string form of an :class:`~kvtier.types.ObjectKey`, ``model@rank@saltdigest@hash``: the name every record
is stored under, and the one parser that reads such a name back (purges, tenants' quotas, events, object names).

Torch-free, so that what only reads names (the server's config, tenant tooling) does not import torch.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import quote, unquote


class KeyFields(NamedTuple):
    """The fields of a key string. ``model_name`` is unquoted; ``quoted_model`` is the name as the string holds it
    (percent-quoted, no ``@`` or ``/`` left). ``salt_digest`` is ``""`` for the unsalted tenant."""

    model_name: str
    quoted_model: str
    kv_rank: int
    salt_digest: str
    chunk_hash: str


def key_str(model_name: str, kv_rank: int, salt_digest: str, chunk_hash: str) -> str:
    """The key string of these fields (what :func:`parse_key_str` reads back)."""
    return f"{quote(model_name, safe='')}@{kv_rank}@{salt_digest}@{chunk_hash}"


def parse_key_str(text: str) -> KeyFields | None:
    """The fields of ``text`` when it has the shape of a key string (four ``@``-separated parts, the rank in ASCII
    decimal digits as :func:`key_str` writes it, without leading zeros), else ``None``. Only the shape is checked:
    a caller that needs a well-formed digest or hash checks those fields itself."""
    parts = text.split("@")
    if len(parts) != 4:
        return None
    quoted, rank, digest, chunk_hash = parts
    # isdigit() alone takes "²" and other Unicode digits, on which int() raises
    if not (rank.isascii() and rank.isdigit()) or str(int(rank)) != rank:
        return None
    return KeyFields(unquote(quoted), quoted, int(rank), digest, chunk_hash)
