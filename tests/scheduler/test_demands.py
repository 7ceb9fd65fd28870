"""Demands: parsing of budgets and weights, context-derived weights, budget checks and
the min-max normalised objective."""

from __future__ import annotations

import pytest

from tailor.demands import Demands, Normalizer, context_weights, load_demands, parse_quantity
from tailor.errors import DemandsError


@pytest.mark.parametrize(
    "text,kind,value",
    [
        ("20ms", "latency", 20.0),
        ("0.5 s", "latency", 500.0),
        ("250us", "latency", 0.25),
        ("12", "latency", 12.0),
        ("5mJ", "energy", 5.0),
        ("0.002J", "energy", 2.0),
        ("4MB", "bytes", 4e6),
        ("512KiB", "bytes", 524288.0),
        (1024, "bytes", 1024.0),
    ],
)
def test_quantities_convert_to_base_units(text, kind, value):
    assert parse_quantity(text, kind) == pytest.approx(value)


@pytest.mark.parametrize(
    "text,kind,message",
    [("20 parsecs", "latency", "unknown unit"), ("fast", "latency", "not a number"),
     ("0ms", "latency", "positive"), ("4MB", "energy", "unknown unit")],
)  # fmt: skip
def test_bad_quantities_name_the_problem(text, kind, message):
    with pytest.raises(DemandsError, match=message):
        parse_quantity(text, kind, what="--max-latency")


def test_accuracy_drop_forms():
    assert Demands.from_options(max_accuracy_drop="1%").max_accuracy_drop == pytest.approx(0.01)
    assert Demands.from_options(max_accuracy_drop="0.02").max_accuracy_drop == pytest.approx(0.02)
    rel = Demands.from_options(max_accuracy_drop="2%rel")
    assert rel.relative_accuracy_drop and rel.accuracy_floor(0.9) == pytest.approx(0.882)
    assert Demands.from_options(max_accuracy_drop="1pt").accuracy_floor(0.9) == pytest.approx(0.89)
    with pytest.raises(DemandsError, match="accuracy drop"):
        Demands.from_options(max_accuracy_drop="lots")


def test_weights_are_normalised_and_checked():
    d = Demands.from_options(weights="latency=2,accuracy=1,energy=1")
    assert d.weights == {"accuracy": 0.25, "latency": 0.5, "energy": 0.25, "storage": 0.0}
    with pytest.raises(DemandsError, match="unknown metric 'speed'"):
        Demands.from_options(weights="speed=1")
    with pytest.raises(DemandsError, match="at least one"):
        Demands.from_options(weights="latency=0")


def test_context_follows_adadeep():
    low = context_weights(battery_mah=1000)  # (4000 - 1000) / 4000 = 0.75
    assert low["energy"] == pytest.approx(0.75) and low["accuracy"] == pytest.approx(0.25)
    full = context_weights(battery_mah=4000)  # floor 0.6
    assert full["energy"] == pytest.approx(0.6)
    small_cache = context_weights(cache_mb=16)
    assert small_cache["storage"] == pytest.approx(0.5) and sum(
        small_cache.values()
    ) == pytest.approx(1)
    assert context_weights(cache_mb=128)["storage"] == 0.0
    # Explicit weights win over the context.
    d = Demands.from_options(battery_mah=1000, weights="latency=1")
    assert d.weights["latency"] == 1.0 and d.battery_mah == 1000


def test_violations_name_each_broken_budget():
    d = Demands.from_options(max_accuracy_drop="1%", max_latency="20ms", max_storage="1MB")
    assert d.violations({"accuracy": 0.895, "latency": 19.0, "storage": 9e5}, 0.9) == []
    broken = d.violations({"accuracy": 0.88, "latency": 25.0, "storage": 2e6}, 0.9)
    assert len(broken) == 3 and broken[1].startswith("latency 25 ms > 20 ms")


def test_objective_prefers_what_the_weights_value():
    rows = [
        {"accuracy": 0.90, "latency": 10.0, "energy": 5.0, "storage": 4e6},  # baseline
        {"accuracy": 0.89, "latency": 4.0, "energy": 2.0, "storage": 3e6},  # fast
        {"accuracy": 0.895, "latency": 9.0, "energy": 4.5, "storage": 1e6},  # small
    ]
    norm = Normalizer.over(rows)
    fast = {"accuracy": 0.0, "latency": 1.0, "energy": 0.0, "storage": 0.0}
    small = {"accuracy": 0.0, "latency": 0.0, "energy": 0.0, "storage": 1.0}
    assert norm.objective(rows[1], fast) < norm.objective(rows[2], fast)
    assert norm.objective(rows[2], small) < norm.objective(rows[1], small)
    assert norm.objective(rows[0], {"accuracy": 1.0}) == 0.0


def test_demands_file(tmp_path):
    path = tmp_path / "demands.yaml"
    path.write_text(
        "max_accuracy_drop: 1%\nmax_latency: 20ms\nmax_storage: 4MB\nusage: {battery_mah: 1000}\n"
    )
    d = load_demands(path)
    assert d.max_latency_ms == 20.0 and d.max_storage_bytes == 4e6
    assert d.weights["energy"] == pytest.approx(0.75)
    path.write_text("max_latancy: 20ms\n")
    with pytest.raises(DemandsError, match="unknown field 'max_latancy'"):
        load_demands(path)
    path.write_text("[unclosed\n")
    with pytest.raises(DemandsError, match="not valid YAML"):
        load_demands(path)
