"""Golden serde payloads: old bytes must keep decoding bit for bit, fp8 must keep encoding bit for bit.

The fixtures and their generator live in ``tests/fixtures/serde/``. A format change that would decode an old
payload into something else fails here; the way to change a format is to bump the stage's ``format_version``
(old records then carry another identity: a miss, never garbage) and add fixtures of the new version.
"""

import json
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch

from kvtier.errors import IntegrityError
from kvtier.serde import LayoutDesc, RecordContext, create_serde_processor

GOLDEN = Path(__file__).parent / "fixtures" / "serde"
MANIFEST = json.loads((GOLDEN / "golden.json").read_text())
CASES: dict[str, dict[str, Any]] = MANIFEST["cases"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@pytest.fixture(autouse=True)
def _golden_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in MANIFEST["test_keys"].items():
        monkeypatch.setenv(name, value)


def _contexts(case: dict[str, Any], associated_data: bytes | None = None) -> list[RecordContext] | None:
    if not case.get("context"):
        return None
    ctx = MANIFEST["context"]
    aad = bytes.fromhex(ctx["associated_data_hex"]) if associated_data is None else associated_data
    return [RecordContext(ctx["cache_salt"], aad)]


def _input(case: dict[str, Any]) -> torch.Tensor:
    data = bytearray((GOLDEN / f"input_{case['input']}.bin").read_bytes())
    return torch.frombuffer(data, dtype=torch.uint8).view(DTYPES[case["input"]]).reshape(case["shape"])


def _payload(name: str) -> torch.Tensor:
    return torch.frombuffer(bytearray((GOLDEN / f"{name}.bin").read_bytes()), dtype=torch.uint8)


def _digest(tensor: torch.Tensor) -> str:
    return blake3.blake3(tensor.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _versions(processor: Any) -> list[int]:
    return [stage.format_version for stage in processor.stages]


def test_every_built_in_stage_has_golden_payloads() -> None:
    covered = set()
    for case in CASES.values():
        stages = case["config"] if isinstance(case["config"], list) else [case["config"]]
        covered |= {stage["type"] for stage in stages}
    assert covered >= {"fp8", "zstd", "lz4", "aesgcm", "checksum"}
    fp8 = {(c["config"].get("fp8_dtype"), c["config"].get("scale")) for c in CASES.values() if c["mode"] == "encode"}
    assert {("float8_e4m3fn", "group"), ("float8_e4m3fn", "none"), ("float8_e5m2", "group")} <= fp8


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_payload_decodes_bit_exact(name: str) -> None:
    case = CASES[name]
    with create_serde_processor(case["config"]) as processor:
        if _versions(processor) != case["format_versions"]:
            # A bumped stage writes a new format: its records carry a new identity, so these old payloads are a
            # miss, never decoded. The new version must come with fixtures of its own.
            newer = [c for c in CASES.values() if c["config"] == case["config"] and c is not case]
            assert any(c["format_versions"] == _versions(processor) for c in newer), (
                f"{name}: the stages' format versions changed to {_versions(processor)}; add golden fixtures of "
                "the new version with make_golden_serde.py (keep the old ones)"
            )
            return
        assert [processor.identity.name, processor.identity.config_hash.hex()] == case["identity"], (
            f"{name}: the pipeline identity changed: every record stored with it would turn foreign"
        )
        src = _input(case)
        out = torch.full_like(src, 3)
        processor.deserialize_batch([_payload(name)], [out], _contexts(case))
        assert _digest(out) == case["decoded_blake3"], f"{name}: old payload decodes into other bytes"
        if case["mode"] == "decode" and not any(s["type"] == "fp8" for s in _stage_configs(case)):
            assert torch.equal(out.view(torch.uint8), src.view(torch.uint8))  # lossless stages give the input back


def _stage_configs(case: dict[str, Any]) -> list[dict[str, Any]]:
    return case["config"] if isinstance(case["config"], list) else [case["config"]]


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c["mode"] == "encode"))
def test_golden_fp8_encodes_bit_exact(name: str) -> None:
    """The fp8 encoder (today's, or any rewrite of it) writes exactly these bytes for this input."""
    case = CASES[name]
    with create_serde_processor(case["config"]) as processor:
        src = _input(case)
        dst = torch.empty(processor.estimate_serialized_size(LayoutDesc.of(src)), dtype=torch.uint8)
        (n,) = processor.serialize_batch([src], [dst])
        golden = _payload(name)
        assert n == golden.numel()
        diff = (dst[:n] != golden).nonzero()
        assert diff.numel() == 0, f"{name}: {diff.numel()} bytes differ, first at offset {int(diff[0])}"


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.get("context")))
def test_golden_payload_under_another_context_is_a_miss(name: str) -> None:
    case = CASES[name]
    with create_serde_processor(case["config"]) as processor:
        src = _input(case)
        result = processor.submit_deserialize([_payload(name)], [torch.empty_like(src)], _contexts(case, b"x")).result()
        assert isinstance(result.errors.get(0), IntegrityError)
