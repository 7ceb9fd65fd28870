"""The candidate space: coupled channel groups decided together, options that fit each
layer's shape, and assignments merged into per-layer plans."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tailor.api import run_pipeline
from tailor.ir import Model
from tailor.ir.ort import make_session
from tailor.passes import check_model
from tailor.plan import pipeline_text
from tailor.space import FEATURES, SpaceConfig, assignment_layers, build_space
from tests.helpers import make_model

MODEL = Path(__file__).resolve().parents[2] / "examples" / "digits_cnn.onnx"
DATA = MODEL.with_name("digits.npz")


def fused(path) -> Model:
    return run_pipeline(path, "fuse").model


def test_units_of_the_example():
    model = fused(MODEL)
    units = build_space(model)
    groups = [u for u in units if u.name.startswith("group")]
    layers = {u.name: u for u in units if not u.name.startswith("group")}
    # The residual block couples /down and /res/conv2: one unit decides both.
    trunk = next(u for u in groups if "/down/down.0/Conv" in u.name)
    assert "/res/conv2/conv2.0/Conv" in trunk.name
    assert set(trunk.options[1].payload) == {"/down/down.0/Conv", "/res/conv2/conv2.0/Conv"}
    labels = [o.label for o in layers["/res/conv1/conv1.0/Conv"].options]
    assert labels[0] == "keep" and "tucker2(rank=0.5)" in labels
    assert "spatial_svd(rank=0.5)" not in labels  # a square 3x3 conv: it would not pay
    assert "tucker2(rank=0.5)+int8" in labels and "quantize(int8)" in labels
    assert "tucker2(rank=0.5)+4bit" in labels and "quantize_weights(bits=4)" in labels
    assert [o.label for o in trunk.options[1:]] == [
        "prune(ratio=0.25)",
        "prune(ratio=0.375)",
        "prune(ratio=0.5)",
        "prune(ratio=0.625)",
    ]
    # A depthwise conv or a tiny layer only gets int8 and storage options.
    dw = [o.label for o in layers["/dw/dw.0/Conv"].options]
    assert not any(label.startswith(("tucker2", "spatial_svd", "svd")) for label in dw)
    assert all(len(u.features) == len(FEATURES) for u in units)
    assert all(u.options[0].label == "keep" and u.options[0].payload == {} for u in units)


def test_assignment_merges_group_and_layer_choices():
    model = fused(MODEL)
    units = build_space(model, SpaceConfig(storage=False))
    choice = [0] * len(units)
    trunk = next(i for i, u in enumerate(units) if "/down/down.0/Conv" in u.name)
    conv2 = next(i for i, u in enumerate(units) if u.name == "/res/conv2/conv2.0/Conv")
    choice[trunk] = 1
    choice[conv2] = [o.label for o in units[conv2].options].index("tucker2(rank=0.5)+int8")
    plans = {lp.layer: lp for lp in assignment_layers(model, units, choice)}
    assert [s.name for s in plans["/res/conv2/conv2.0/Conv"].steps] == [
        "prune_channels",
        "tucker2",
        "quantize",
    ]
    assert [s.name for s in plans["/down/down.0/Conv"].steps] == ["prune_channels"]
    text = pipeline_text(list(plans.values()))
    assert text.index("prune_channels") < text.index("tucker2") < text.index("quantize")


def test_factorization_with_4bit_weights_builds_and_stays_close():
    """Every layer that offers it takes `tucker2(...)+4bit`: the plan builds with full checks, runs in onnxruntime, the factorized layers'
    weights are decoded from 4-bit codes (a smaller file), and top-1 agrees with the
    original on at least 90 % of the example's held-out inputs (lossy: 0.958 when written,
    tucker2 alone 0.939)."""
    model = fused(MODEL)
    data = np.load(DATA)
    units = build_space(model)

    def build(tag: str):
        choice = []
        for u in units:
            labels = [o.label for o in u.options]
            choice.append(labels.index(tag) if tag in labels else 0)
        text = pipeline_text(assignment_layers(model, units, choice))
        return text, run_pipeline(model, text, calibration={"input": data["calib_x"]}).model

    text, both = build("tucker2(rank=0.5)+4bit")
    assert "tucker2" in text and "quantize_weights(bits=4" in text
    _, factor_only = build("tucker2(rank=0.5)")
    check_model(both, full=True)
    # Each factorized layer's core (its largest weight) is decoded from 4-bit codes at run
    # time (the pass leaves a tiny tensor alone where decoding nodes would cost more).
    cores = [n.name for n in factor_only.nodes if n.op == "Conv" and n.name.endswith("_core")]
    assert len(cores) == 3
    for name in cores:
        assert Model.constant_value(factor_only.node(name).inputs[1]) is not None
        assert Model.constant_value(both.node(name).inputs[1]) is None, name
    assert len(both.to_bytes()) < len(factor_only.to_bytes())
    x = data["test_x"]
    ref = make_session(model).run(None, {"input": x})[0].argmax(axis=1)
    out = make_session(both).run(None, {"input": x})[0].argmax(axis=1)
    assert (ref == out).mean() >= 0.9


def test_a_config_without_options_leaves_no_units():
    model = fused(MODEL)
    nothing = SpaceConfig(
        prune_ratios=(),
        tucker_ranks=(),
        spatial_ranks=(),
        svd_ranks=(),
        quantize=False,
        storage=False,
    )
    assert build_space(model, nothing) == []


def test_real_architecture_groups(arch_path):
    model = fused(arch_path("resnet18"))
    units = build_space(model, SpaceConfig(storage=False, quantize=False))
    groups = [u for u in units if u.name.startswith("group")]
    # Every residual stage is one coupled group with several producers.
    assert any(len(u.options[1].payload) >= 3 for u in groups)
    producers = [layer for u in groups for layer in u.options[1].payload]
    assert len(producers) == len(set(producers)), "a layer is in one group only"


def test_only_factorizations_that_pay_are_offered():
    """spatial_svd at rank 0.5 of a square 3x3 conv is exactly as large as the conv (the
    pass would skip it): not offered. Of a conv that widens 16 -> 64 it takes 0.75 of
    the weights: offered, and the pass applies it."""
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1,16,12,12] x) => (float[1,64,12,12] y)
          <float[16,16,3,3] w1, float[16] b1, float[64,16,3,3] w2, float[64] b2> {
          h = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu (h)
          y = Conv <pads=[1,1,1,1]> (r, w2, b2)
        }
        """
    )
    units = {u.name: [o.label for o in u.options] for u in build_space(model)}
    square, wide = (units[n.name] for n in model.nodes if n.op == "Conv")
    assert "tucker2(rank=0.5)" in square and "spatial_svd(rank=0.5)" not in square
    assert "spatial_svd(rank=0.5)" in wide
    wide_name = [n.name for n in model.nodes if n.op == "Conv"][1]
    out = run_pipeline(model, f"spatial_svd(rank=0.5,layers={wide_name})").model
    assert len([n for n in out.nodes if n.op == "Conv"]) == 3
