"""Plans: per-layer steps to canonical pipeline text, file round trips, exact replay
through the API and `tailor apply`, and the errors a hand-edited or foreign plan gets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tailor.api import apply_plan, run_pipeline
from tailor.cli import main
from tailor.errors import PlanError
from tailor.ir import Model
from tailor.plan import LayerPlan, Plan, Step, layer_selector, model_digest, pipeline_text
from tests.helpers import assert_valid

EXAMPLE = Path(__file__).resolve().parents[2] / "examples"
MODEL = EXAMPLE / "digits_cnn.onnx"


def calib() -> dict[str, np.ndarray]:
    with np.load(EXAMPLE / "digits.npz") as f:
        x = f["calib_x"][:64]
    return {Model.load(MODEL).inputs[0].name: x}


def example_plan() -> Plan:
    return Plan(
        layers=[
            LayerPlan("/stem/stem.0/Conv", "Conv"),
            LayerPlan("/down/down.0/Conv", "Conv", [Step.of("prune_channels", ratio=0.5)]),
            LayerPlan(
                "/res/conv1/conv1.0/Conv",
                "Conv",
                [Step.of("quantize", mode="int8"), Step.of("tucker2", rank=0.5)],
            ),
            LayerPlan("/pw/pw.0/Conv", "Conv", [Step.of("quantize", mode="int8")]),
            LayerPlan("/fc1/Gemm", "Gemm", [Step.of("quantize_weights", bits=8)]),
        ],
        model_sha256=model_digest(MODEL.read_bytes()),
        model_name="digits_cnn",
        strategy="greedy",
        seed=3,
    )


def test_steps_run_in_stages_and_share_calls():
    text = pipeline_text(example_plan().layers)
    assert text == (
        "fuse,prune_channels(ratio=0.5,layers=/down/down.0/Conv),"
        "tucker2(rank=0.5,layers=/res/conv1/conv1.0/Conv),"
        # quantize follows tucker2 on conv1: it must also match the factors' nodes
        "quantize(mode=int8,layers=/res/conv1/conv1.0/Conv|/res/conv1/conv1.0/Conv_*|/pw/pw.0/Conv),"
        "quantize_weights(bits=8,layers=/fc1/Gemm)"
    )
    plan = example_plan()
    assert plan.pipeline.startswith("fuse,prune_channels(ratio=0.5,layers=/down/down.0/Conv)")


def test_selector_escapes_glob_characters_and_refuses_what_it_cannot_write():
    assert layer_selector(["a[1]*"]) == "a[[]1][*]"
    with pytest.raises(PlanError, match="cannot be written"):
        layer_selector(["a|b"])
    with pytest.raises(PlanError, match="cannot be part of a plan"):
        Step.of("fuse")
    with pytest.raises(PlanError, match="twice"):
        pipeline_text([LayerPlan("a", "Conv", [Step.of("svd", rank=2), Step.of("svd", rank=3)])])


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_a_file(tmp_path, suffix):
    plan = example_plan()
    path = plan.save(tmp_path / f"plan{suffix}")
    again = Plan.load(path)
    assert again.pipeline == plan.pipeline
    assert again.as_dict() == plan.as_dict()


def test_apply_replays_the_pipeline_exactly(tmp_path):
    plan = example_plan()
    data = calib()
    out = tmp_path / "out.onnx"
    result = apply_plan(MODEL, plan, out, calibration=data)
    direct = run_pipeline(MODEL, plan.pipeline, calibration=data, seed=plan.seed)
    assert result.pipeline == plan.pipeline
    replay, again = Model.load(out), direct.model
    assert [n.op for n in replay.nodes] == [n.op for n in again.nodes]
    x = {replay.inputs[0].name: next(iter(data.values()))[:8]}
    from tailor.ir import run_model

    np.testing.assert_array_equal(
        next(iter(run_model(replay, x).values())), next(iter(run_model(again, x).values()))
    )
    ops = {n.op for n in replay.nodes}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert_valid(replay)


def test_apply_refuses_a_plan_for_another_model(tmp_path):
    plan = example_plan()
    plan.model_sha256 = "0" * 64
    with pytest.raises(PlanError, match="made for another model"):
        apply_plan(MODEL, plan, calibration=calib())
    apply_plan(MODEL, plan, calibration=calib(), force=True)


def test_hand_edited_or_unknown_plans_fail_clearly(tmp_path):
    data = example_plan().as_dict()
    data["pipeline"] = "fuse"
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="does not match its layers"):
        Plan.load(path)
    data = example_plan().as_dict()
    data["layers"][1]["passes"][0]["params"]["ratio"] = 1.5
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"edited.json: .*ratio"):
        Plan.load(path)
    path.write_text("{not json: [")
    with pytest.raises(PlanError, match="neither YAML nor JSON"):
        Plan.load(path)
    with pytest.raises(PlanError, match="not a tailor plan"):
        Plan.from_dict({"target": "host"})


def test_cli_apply(tmp_path, capsys):
    plan_path = example_plan().save(tmp_path / "plan.yaml")
    np.savez(tmp_path / "calib.npz", **calib())
    out = tmp_path / "out.onnx"
    code = main(
        ["apply", str(MODEL), str(plan_path), "-o", str(out), "--data", str(tmp_path / "calib.npz")]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "applied 4 layer change(s) of 5" in printed and out.is_file()
    # Without the data the plan's pruning and int8 need: one clear line, no output file.
    out.unlink()
    code = main(["apply", str(MODEL), str(plan_path), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    last = [line for line in err.splitlines() if line.startswith("tailor: error:")]
    assert len(last) == 1 and "needs calibration data" in last[0] and "--data" in last[0]
