"""The fp8 kernel bench, tiny: every figure and ratio is there, and each ratio comes from one sample per round."""

import json

import pytest
import torch

from kvtier.bench import fp8_kernels


def test_report_has_every_figure_and_interleaved_ratios() -> None:
    report = fp8_kernels.run(3, torch.float8_e4m3fn, outliers=1, shape=(2, 1, 8, 16))
    assert report["rounds"] == 3 and report["threads"] == 1 and report["cpu_count"] >= 1
    assert len(report["loadavg_before"]) == 3
    named = {name for _, num, den, _ in fp8_kernels.RATIOS + fp8_kernels.WIDE_RATIOS for name in (num, den)}
    assert named <= set(report["ms"])
    assert {"memcpy_bf16", "table_decode", "split_encode_2w", "scaled_decode_fp32"} <= named
    assert len(report["ratios"]) == len(fp8_kernels.RATIOS) + len(fp8_kernels.WIDE_RATIOS)
    for label, entry in report["ratios"].items():
        assert set(entry) == ({"wall"} if "workers" in label else {"cpu", "wall"})  # two threads: wall time only
        for clock in entry:
            assert entry[clock]["samples"] == 3  # one per round: the baseline is sampled with the operation
            assert entry[clock]["p10"] <= entry[clock]["median"] <= entry[clock]["p90"]
    json.dumps(report)


def test_bf16_only_report_and_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    fp8_kernels.main(["--rounds", "2", "--shape", "2,1,8,16", "--no-wide"])
    out = capsys.readouterr().out
    assert "split encode / whole encode, 2 workers" in out and "fp16:" not in out


def test_cli_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    fp8_kernels.main(["--rounds", "2", "--fp8", "float8_e5m2", "--shape", "2,1,8,16", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["fp8"] == "float8_e5m2" and report["shape"] == [2, 1, 8, 16]


def test_cli_rejects_a_bad_shape() -> None:
    with pytest.raises(SystemExit):
        fp8_kernels.main(["--shape", "2,x", "--json"])
