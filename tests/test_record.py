"""The L2 record: every kind of damage or mismatch is an IntegrityError; golden files keep decoding."""

import json
import sys
from pathlib import Path

import pytest
import torch

from kvtier import IntegrityError
from kvtier.l2.record import (
    FORMAT_VERSION,
    MAX_HEADER_SIZE,
    RecordMeta,
    header_size,
    pack_record,
    parse_header,
    read_record,
    write_header,
)
from kvtier.serde import create_serde_processor
from kvtier.serde.processor import SerdeIdentity
from kvtier.types import LayoutDesc, ObjectKey

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_golden_records import golden_cases  # noqa: E402

RAW = create_serde_processor({"type": "raw"}).identity
KEY = ObjectKey("m", "ab").to_str()


def make(payload: bytes = bytes(range(48)), shape: tuple[int, ...] = (2, 1, 3, 4)) -> tuple[RecordMeta, bytes]:
    meta = RecordMeta(RAW, LayoutDesc(shape, torch.bfloat16), KEY)
    return meta, pack_record(meta, payload)


def test_round_trip_and_alignment() -> None:
    meta, rec = make()
    got, payload = read_record(rec, serde=RAW, key=KEY, layout=meta.layout)
    assert got == meta and bytes(payload) == bytes(range(48))
    assert header_size(meta) % 64 == 0 and header_size(meta) <= MAX_HEADER_SIZE


def test_write_header_in_place_around_a_payload() -> None:
    meta = RecordMeta(RAW, LayoutDesc((4,), torch.float32), KEY)
    hlen = header_size(meta)
    buf = torch.zeros(hlen + 16 + 100, dtype=torch.uint8)  # room to spare, as a serializer's bound leaves
    buf[hlen : hlen + 16] = torch.arange(16, dtype=torch.uint8)
    total = write_header(buf, meta, 16)
    assert total == hlen + 16
    _, payload = read_record(buf[:total])
    assert bytes(payload) == bytes(range(16))


def test_every_flipped_bit_is_detected() -> None:
    _, rec = make()
    for byte in range(len(rec)):
        for bit in range(8):
            bad = bytearray(rec)
            bad[byte] ^= 1 << bit
            with pytest.raises(IntegrityError):
                read_record(bad)


@pytest.mark.parametrize("cut", [0, 1, 47, 63, 64, 100])
def test_truncated_record_is_rejected(cut: int) -> None:
    _, rec = make()
    with pytest.raises(IntegrityError):
        read_record(rec[: len(rec) - 1 - cut] if cut < len(rec) else b"")


def test_padded_record_is_rejected() -> None:
    _, rec = make()
    with pytest.raises(IntegrityError, match="truncated or padded"):
        read_record(rec + b"\0")


def test_foreign_serde_layout_key_and_garbage() -> None:
    _, rec = make()
    other = SerdeIdentity("raw", bytes(16))
    with pytest.raises(IntegrityError, match="serde"):
        read_record(rec, serde=other)
    with pytest.raises(IntegrityError, match="holds"):
        read_record(rec, layout=LayoutDesc((2, 1, 4, 3), torch.bfloat16))
    with pytest.raises(IntegrityError, match="holds"):
        read_record(rec, layout=LayoutDesc((2, 1, 3, 4), torch.float16))
    with pytest.raises(IntegrityError, match="belongs to key"):
        read_record(rec, key=ObjectKey("m", "cd").to_str())
    with pytest.raises(IntegrityError, match="not a kvtier record"):
        read_record(b"\x00" * 200)
    with pytest.raises(IntegrityError, match="too short"):
        read_record(b"KVTR")


def test_future_version_is_rejected() -> None:
    _, rec = make()
    bad = bytearray(rec)
    bad[4:6] = (FORMAT_VERSION + 1).to_bytes(2, "little")
    with pytest.raises(IntegrityError, match="version"):
        read_record(bad)


def test_parse_header_needs_only_the_header() -> None:
    meta, rec = make()
    got, hlen, plen = parse_header(rec[:MAX_HEADER_SIZE], total_size=len(rec))
    assert got == meta and hlen + plen == len(rec)
    with pytest.raises(IntegrityError):
        parse_header(rec[:MAX_HEADER_SIZE], total_size=len(rec) - 1)


@pytest.mark.parametrize("name", sorted(p.stem for p in (FIXTURES / "records").glob("*.kvtr")))
def test_golden_records_decode(name: str) -> None:
    """The format is frozen: a change that breaks these files must be deliberate (new version, new files)."""
    expect = json.loads((FIXTURES / "records" / f"{name}.json").read_text())
    data = (FIXTURES / "records" / f"{name}.kvtr").read_bytes()
    meta, payload = read_record(data)
    assert meta.serde.name == expect["serde_name"] and meta.serde.config_hash.hex() == expect["serde_hash"]
    assert meta.layout == LayoutDesc.from_json(expect["layout"]) and meta.key == expect["key"]
    assert bytes(payload).hex() == expect["payload_hex"]
    # and today's writer still produces the same bytes
    if name in golden_cases():
        cur_meta, cur_payload = golden_cases()[name]
        assert pack_record(cur_meta, cur_payload) == data
