"""Tests for the energy cost models: the analytic model on a hand-computed conv, the power
model from a latency, which one model_energy picks, and the RAPL and Jetson INA readers on
fake sysfs trees (absent, unreadable, wraparound)."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest

from tailor.cost_models.base import Estimate
from tailor.cost_models.energy import (
    E_MAC_PJ,
    analytic_energy_mj,
    layer_energy,
    measure_energy,
    measure_energy_ina,
    model_energy,
    power_model_energy,
    read_ina_power,
)
from tailor.errors import TargetError
from tailor.targets import Target
from tests.helpers import make_model, run_passes

HEADER = '<ir_version: 8, opset_import: ["" : 13]>'
CONV = f"""
{HEADER}
g (float[N,8,10,10] x) => (float[N,16,10,10] y) <float[16,8,3,3] w, float[16] b> {{
  y = Conv <pads=[1,1,1,1]> (x, w, b)
}}
"""
BOARD = Target(
    name="board",
    description="a test board",
    tvm_target={"kind": "llvm"},
    cores=1,
    peak_gflops={"float32": 1.0},
    mem_bandwidth_gbs=1.0,
    memory_mb=64,
    storage_mb=64,
    power_idle_w=2.0,
    power_active_w=5.0,
    sources={"power_active_w": "the board's data sheet"},
)
# MACs 16*8*9*100, params 1168, activations 8*100 in + 16*100 out.
CONV_MJ = 52.8e-9 * (115200 + 6 * 1168 + 200 * (800 + 1600))


# ---------------------------------------------------------------- analytic
def test_analytic_conv_hand_computed():
    assert E_MAC_PJ == 52.8
    assert analytic_energy_mj(115200, 1168, 2400) == pytest.approx(CONV_MJ)
    model = make_model(CONV)
    got = layer_energy(model)["Conv_0"]
    assert (got.unit, got.source) == ("mJ", "analytic")
    assert got.value == pytest.approx(CONV_MJ, rel=1e-12)
    assert "each weight read once" in got.note and "DRAM" in got.note
    # Batch 2: MACs and activations double, weights are read once.
    two = layer_energy(model, batch=2)["Conv_0"].value
    assert two == pytest.approx(52.8e-9 * (2 * 115200 + 6 * 1168 + 200 * 2 * 2400))


# ---------------------------------------------------------------- power model
def test_power_model():
    latency = Estimate(10.0, "ms", "measured")
    got = power_model_energy(latency, BOARD)
    assert (got.value, got.unit, got.source) == (30.0, "mJ", "power-model")
    assert "measured latency" in got.note and "board" in got.note and "data sheet" in got.note
    assert power_model_energy(Estimate(0.01, "s", "tvm-tuned"), BOARD).value == pytest.approx(30)
    assert power_model_energy(Estimate(10_000, "us", "roofline"), BOARD).value == pytest.approx(30)
    with pytest.raises(ValueError, match="latency must be in ms"):
        power_model_energy(Estimate(1.0, "MAC", "exact"), BOARD)


def test_model_energy_follows_latency_when_given():
    model = make_model(CONV)
    analytic = model_energy(model)
    assert list(analytic) == ["energy_mj"]
    assert analytic["energy_mj"].source == "analytic"
    assert analytic["energy_mj"].value == pytest.approx(CONV_MJ)
    timed = model_energy(model, BOARD, Estimate(4.0, "ms", "learned"))
    assert list(timed) == ["energy_mj"]
    assert (timed["energy_mj"].source, timed["energy_mj"].value) == ("power-model", 12.0)
    both = model_energy(model, BOARD, Estimate(4.0, "ms", "learned"), both=True)
    assert both["energy_mj"] == both["energy_mj_power_model"] == timed["energy_mj"]
    assert both["energy_mj_analytic"] == analytic["energy_mj"]
    with pytest.raises(TargetError, match="needs a target"):
        model_energy(model, None, Estimate(4.0, "ms", "measured"))


def test_int8_that_runs_slower_costs_more_energy():
    # Dynamic quantization keeps the MACs, so the analytic model cannot tell the two
    # apart; a slower int8 latency (ISPA 2018: +39 % energy on a TX2 GPU) must show.
    model = make_model(CONV)
    int8 = run_passes(model, "quantize(mode=dynamic)")
    assert model_energy(int8)["energy_mj"].value == pytest.approx(CONV_MJ)
    fp = model_energy(model, BOARD, Estimate(10.0, "ms", "measured"))["energy_mj"].value
    q = model_energy(int8, BOARD, Estimate(13.9, "ms", "measured"))["energy_mj"].value
    assert q / fp == pytest.approx(1.39)


def test_layer_energy_mixes_sources():
    model = make_model(
        f"""{HEADER}
        g (float[1,32] x) => (float[1,4] y) <float[32,16] w, float[16,4] w2> {{
          a = MatMul (x, w)
          y = MatMul (a, w2)
        }}"""
    )
    got = layer_energy(model, BOARD, {"MatMul_1": Estimate(2.0, "ms", "tvm-tuned")})
    assert got["MatMul_0"].source == "analytic"
    assert got["MatMul_0"].value == pytest.approx(52.8e-9 * (512 + 6 * 512 + 200 * 48))
    assert (got["MatMul_1"].source, got["MatMul_1"].value) == ("power-model", 6.0)
    with pytest.raises(TargetError):
        layer_energy(model, None, {"MatMul_1": Estimate(2.0, "ms", "measured")})


# ---------------------------------------------------------------- RAPL
def zone(root: Path, name: str, label: str, energy: int, top: int | None = 1000_000) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text(f"{energy}\n")
    if top is not None:
        (d / "max_energy_range_uj").write_text(f"{top}\n")
    return d


def bump(d: Path, delta: int, top: int = 1000_000) -> None:
    value = int((d / "energy_uj").read_text())
    (d / "energy_uj").write_text(f"{(value + delta) % top}\n")


def test_rapl_sums_packages_and_dram_only(tmp_path):
    pkg0 = zone(tmp_path, "intel-rapl:0", "package-0", 100)
    core = zone(tmp_path, "intel-rapl:0:0", "core", 50)
    dram = zone(tmp_path, "intel-rapl:0:1", "dram", 10)
    pkg1 = zone(tmp_path, "intel-rapl:1", "package-1", 7)
    psys = zone(tmp_path, "intel-rapl:2", "psys", 0)

    def run():
        bump(pkg0, 5000)
        bump(core, 3000)  # nested in the package: not added again
        bump(dram, 1000)
        bump(pkg1, 2000)
        bump(psys, 99_000)  # the platform: used only without packages

    clock = itertools.count(0.0, 0.002).__next__  # read at the start and at the end
    got = measure_energy(run, repeat=4, root=tmp_path, clock=clock)
    assert (got.unit, got.source) == ("mJ", "measured")
    assert got.value == pytest.approx(8.0)  # 8000 uJ per run
    assert "package-0" in got.note and "dram" in got.note and "core" not in got.note
    assert "16.0 W mean" in got.note  # 32 mJ over 2 ms
    without = measure_energy(run, repeat=2, root=tmp_path, include_dram=False)
    assert without.value == pytest.approx(7.0)


def test_rapl_wraparound(tmp_path):
    pkg = zone(tmp_path, "intel-rapl:0", "package-0", 1000_000 - 3000)
    got = measure_energy(lambda: bump(pkg, 5000), repeat=3, root=tmp_path)
    # The counter wraps during the first run (999000 -> 2000): still 5000 uJ per run.
    assert int((pkg / "energy_uj").read_text()) == 12000
    assert got.value == pytest.approx(5.0)


def test_rapl_wrap_without_range_is_refused(tmp_path, caplog):
    pkg = zone(tmp_path, "intel-rapl:0", "package-0", 900, top=None)
    caplog.set_level(logging.WARNING)
    assert measure_energy(lambda: bump(pkg, 200, top=1000), repeat=1, root=tmp_path) is None
    assert "range unknown" in caplog.text


def test_rapl_absent_or_unreadable(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    calls = []
    assert measure_energy(lambda: calls.append(1), root=tmp_path / "none") is None
    assert "no RAPL powercap interface" in caplog.text
    assert measure_energy(lambda: calls.append(1), root=tmp_path) is None
    assert "no RAPL package zone" in caplog.text
    d = zone(tmp_path, "intel-rapl:0", "package-0", 0)
    (d / "energy_uj").write_text("permission denied\n")
    assert measure_energy(lambda: calls.append(1), root=tmp_path) is None
    assert "not readable" in caplog.text
    assert calls == []  # nothing is run when nothing can be measured
    with pytest.raises(ValueError, match="repeat"):
        measure_energy(lambda: None, repeat=0, root=tmp_path)


def test_rapl_on_this_host():
    # Absent in containers, root-only on most hosts: either way no exception.
    got = measure_energy(lambda: np.ones(1000).sum(), repeat=2)
    assert got is None or (got.source == "measured" and got.value >= 0)


# ---------------------------------------------------------------- Jetson INA3221
def ina(root: Path, rails: dict[str, float], device: str = "1-0040") -> Path:
    d = root / device / "iio:device0"
    d.mkdir(parents=True)
    for i, (name, mw) in enumerate(rails.items()):
        if name:
            (d / f"rail_name_{i}").write_text(name + "\n")
        (d / f"in_power{i}_input").write_text(f"{mw:g}\n")
    return d


def test_read_ina_power(tmp_path):
    ina(tmp_path, {"VDD_IN": 4200, "VDD_SYS_GPU": 950, "": 12})
    assert read_ina_power(tmp_path) == {
        "VDD_IN": 4200.0,
        "VDD_SYS_GPU": 950.0,
        "1-0040/power2": 12.0,
    }
    assert read_ina_power(tmp_path / "none") == {}


def test_measure_energy_ina_trapezoid(tmp_path):
    d = ina(tmp_path, {"VDD_IN": 1000, "VDD_SYS_GPU": 400})

    def run():  # the board draws 3 W once the run starts
        (d / "in_power0_input").write_text("3000\n")

    clock = itertools.count(0.0, 0.01).__next__
    got = measure_energy_ina(run, repeat=2, root=tmp_path, clock=clock)
    # (1000+3000)/2 mW x 10 ms + 3000 mW x 10 ms = 50 mJ over two runs.
    assert (got.value, got.unit, got.source) == (pytest.approx(25.0), "mJ", "measured")
    assert "VDD_IN" in got.note and "VDD_SYS_GPU" not in got.note
    (d / "in_power0_input").write_text("1000\n")
    clock = itertools.count(0.0, 0.01).__next__
    summed = measure_energy_ina(run, 2, root=tmp_path, rails=["VDD_IN", "VDD_SYS_GPU"], clock=clock)
    assert summed.value == pytest.approx(25.0 + 4.0)


def test_measure_energy_ina_absent_or_unknown_rail(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    assert measure_energy_ina(lambda: None, root=tmp_path / "none") is None
    assert "no INA3221 rails" in caplog.text
    ina(tmp_path, {"POM_5V_IN": 5000})
    assert measure_energy_ina(lambda: None, root=tmp_path, rails=["VDD_IN"]) is None
    assert "no rail ['VDD_IN']" in caplog.text
    (tmp_path / "1-0040" / "iio:device0" / "in_power0_input").write_text("n/a\n")
    assert measure_energy_ina(lambda: None, root=tmp_path) is None
    assert "not readable" in caplog.text
