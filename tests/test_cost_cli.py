"""`tailor cost`: per-layer and total figures with sources, on every shipped target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailor.cli import main
from tailor.targets import available_targets

MODEL = Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.onnx"


@pytest.mark.parametrize("target", sorted(available_targets()))
def test_every_shipped_target_gets_every_figure_with_a_source(target, capsys):
    code = main(["cost", str(MODEL), "-t", target, "--json", "--runs", "5"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    total = data["total"]
    for key in ("latency_ms", "energy_mj", "storage_bytes", "macs", "peak_memory_bytes"):
        assert total[key]["value"] > 0 and total[key]["source"], key
    assert total["storage_bytes"]["value"] == MODEL.stat().st_size
    assert total["macs"]["value"] == 1_553_536
    # The host is measured; other targets are predicted and say so.
    expected = {"measured"} if target == "host" else {"roofline", "learned"}
    assert total["latency_ms"]["source"] in expected
    assert total["energy_mj"]["source"] == "power-model"
    layers = [layer for layer in data["layers"] if "macs" in layer["metrics"]]
    assert len(layers) == 8
    assert sum(layer["metrics"]["macs"]["value"] for layer in layers) == total["macs"]["value"]
    assert all("latency_ms" in layer["metrics"] for layer in data["layers"])


def test_table_output_and_errors(capsys):
    assert main(["cost", str(MODEL), "-t", "rpi4"]) == 0
    out = capsys.readouterr().out
    assert "/down/down.0/Conv" in out and "[roofline]" in out and "[power-model]" in out
    assert main(["cost", str(MODEL), "-t", "no-such-board"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-board" in err
    assert main(["cost", str(MODEL), "--rpc", "127.0.0.1:9190"]) == 2
    assert "go together" in capsys.readouterr().err
