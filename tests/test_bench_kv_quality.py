"""kvtier bench kv-quality on SmolLM2 (small prefix): raw is exact; scaled fp8 keeps more KV elements accurate."""

import argparse

import pytest

pytest.importorskip("transformers")

from kvtier.bench import kv_quality
from kvtier.serde import registered_serdes


@pytest.mark.skipif("fp8" not in registered_serdes(), reason="fp8 serde not registered")
def test_kv_quality_on_smollm2() -> None:
    report = kv_quality.run(argparse.Namespace(prefix=256, cont=16, json=True))
    figures = {f.name: f for f in report.figures}
    assert figures["raw: max |logits diff|"].value == 0.0
    assert figures["raw: perplexity"].ratio == 1.0
    scaled = figures["fp8 e4m3 scaled: KV elements off > 10 %"].value
    unscaled = figures["fp8 e4m3 unscaled: KV elements off > 10 %"].value
    assert scaled < unscaled
    assert 0.0 < figures["fp8 e4m3 scaled: max |logits diff|"].value < 5.0
