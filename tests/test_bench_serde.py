"""``kvtier bench serde`` runs on the harness: serialize and deserialize each beside an interleaved memcpy (and
torch's casts for fp8), the size ratio and errors reported, no target in the output."""

import json

import pytest

from kvtier.cli import main
from kvtier.serde import registered_serdes


def _figures(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["bench", "serde", "--shape", "2,2,16,32", "--rounds", "3", "--json", *argv]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["params"]["rounds"] == 3 and doc["load"]["cpus"] >= 1
    return {f["name"]: f for f in doc["figures"]}


def test_raw(capsys: pytest.CaptureFixture[str]) -> None:
    figures = _figures(capsys, "--serde", "raw", "--workers", "2", "--order", "random")
    for op in ("serialize", "deserialize"):
        fig = figures[f"{op} (GB/s of KV)"]
        assert fig["baseline"] == "memcpy" and fig["rounds"] == 3 and fig["ratio"] > 0 and "target" not in fig
    assert figures["max abs error"]["note"] == "lossless"
    assert figures["size ratio (KV bytes per serialized byte)"]["value"] == pytest.approx(1.0, rel=0.05)


@pytest.mark.skipif("fp8" not in registered_serdes(), reason="fp8 serde not registered")
def test_fp8_beside_torch_casts(capsys: pytest.CaptureFixture[str]) -> None:
    figures = _figures(capsys, "--serde", "fp8", "--outliers", "1")
    assert figures["serialize vs torch .to(float8_e4m3fn)"]["baseline"] == "torch .to(float8_e4m3fn)"
    assert figures["deserialize vs torch fp8 .to(torch.bfloat16)"]["rounds"] == 3
    assert figures["max abs error"]["note"] == "lossy"
