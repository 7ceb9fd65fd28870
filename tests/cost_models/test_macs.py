"""Tests for the MACs/params cost model: hand-computed counts for every layer kind, the
integer layers of onnxruntime's quantizers, weights computed by decode subgraphs (the
storage passes and `quantize`), batches, dynamic shapes and real architectures."""

from __future__ import annotations

import numpy as np
import pytest

from tailor.cost_models.macs import layer_macs, model_macs, weighted_layers
from tailor.cost_models.memory import resolve_batch
from tailor.errors import DynamicShapeError
from tailor.ir import Model
from tailor.ir.layers import summarize
from tests.helpers import make_model, run_passes

HEADER = '<ir_version: 8, opset_import: ["" : 13]>'


def counts(model: Model, batch: int = 1) -> dict[str, tuple[int, int]]:
    return {
        name: (int(m["macs"].value), int(m["params"].value))
        for name, m in layer_macs(model, batch).items()
    }


CONV = f"""
{HEADER}
g (float[N,8,10,10] x) => (float[N,16,10,10] y) <float[16,8,3,3] w, float[16] b> {{
  y = Conv <pads=[1,1,1,1]> (x, w, b)
}}
"""


def test_conv_hand_computed():
    model = make_model(CONV)
    # 16 outputs x 10 x 10 positions, each 8 inputs x 3 x 3 taps.
    assert counts(model) == {"Conv_0": (16 * 8 * 9 * 10 * 10, 16 * 8 * 9 + 16)}
    est = layer_macs(model)["Conv_0"]
    assert est["macs"].unit == "MAC" and est["macs"].source == "exact"
    assert est["params"].unit == "params" and est["params"].source == "exact"
    # A symbolic batch scales MACs, not parameters.
    assert counts(model, batch=4)["Conv_0"] == (4 * 115200, 1168)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # grouped, strided: 16 x 5 x 5 outputs, 8/2 inputs x 9 taps each
            "g (float[1,8,10,10] x) => (float[1,16,5,5] y) <float[16,4,3,3] w> "
            "{ y = Conv <pads=[1,1,1,1], strides=[2,2], group=2> (x, w) }",
            (16 * 5 * 5 * 4 * 9, 16 * 4 * 9),
        ),
        (  # depthwise
            "g (float[1,6,8,8] x) => (float[1,6,6,6] y) <float[6,1,3,3] w> "
            "{ y = Conv <group=6> (x, w) }",
            (6 * 6 * 6 * 9, 54),
        ),
        (  # ConvTranspose: each of 4 x 5 x 5 inputs scatters into 6 outputs x 9 taps
            "g (float[1,4,5,5] x) => (float[1,6,11,11] y) <float[4,6,3,3] w, float[6] b> "
            "{ y = ConvTranspose <strides=[2,2]> (x, w, b) }",
            (4 * 5 * 5 * 6 * 9, 4 * 6 * 9 + 6),
        ),
        (
            "g (float[1,32] x) => (float[1,10] y) <float[10,32] w, float[10] b> "
            "{ y = Gemm <transB=1> (x, w, b) }",
            (32 * 10, 330),
        ),
        (  # transA: the rows are the input's second axis
            "g (float[32,3] x) => (float[3,10] y) <float[32,10] w> { y = Gemm <transA=1> (x, w) }",
            (3 * 32 * 10, 320),
        ),
        (  # batched MatMul: 5 rows of 32 -> 8
            "g (float[1,5,32] x) => (float[1,5,8] y) <float[32,8] w> { y = MatMul (x, w) }",
            (5 * 8 * 32, 256),
        ),
        (  # weight first: W[8,5] @ x[1,5,7] contracts 5
            "g (float[1,5,7] x) => (float[1,8,7] y) <float[8,5] w> { y = MatMul (w, x) }",
            (8 * 7 * 5, 40),
        ),
    ],
    ids=[
        "grouped",
        "depthwise",
        "conv_transpose",
        "gemm",
        "gemm_transA",
        "matmul",
        "matmul_w_first",
    ],
)
def test_layer_kinds(text, expected):
    model = make_model(f"{HEADER}\n{text}")
    assert list(counts(model).values()) == [expected]


def test_two_activations_is_not_a_layer():
    model = make_model(
        f"""{HEADER}
        g (float[1,4,8] a, float[1,8,4] b) => (float[1,4,4] y) {{ y = MatMul (a, b) }}"""
    )
    assert layer_macs(model) == {}
    assert model_macs(model)["macs"].value == 0


def test_totals_are_sums_and_weights_read_twice_count_twice():
    model = make_model(
        f"""{HEADER}
        g (float[1,16] x) => (float[1,16] y) <float[16,16] w> {{
          a = MatMul (x, w)
          r = Relu (a)
          y = MatMul (r, w)
        }}"""
    )
    assert counts(model) == {"MatMul_0": (256, 256), "MatMul_1": (256, 256)}
    total = model_macs(model)
    assert (total["macs"].value, total["params"].value) == (512, 512)


INTEGER = f"""
{HEADER}
g (uint8[1,8,10,10] x, uint8[1,32] v) => (int32[1,16,10,10] c, int32[1,10] m, uint8[1,16,10,10] q, uint8[1,10] p)
  <int8[16,8,3,3] wq, int8[32,10] mq, int8 wz = {{0}}, uint8 xz = {{0}}, float s = {{0.1}}, int32[16] bq> {{
  c = ConvInteger <pads=[1,1,1,1]> (x, wq, xz, wz)
  m = MatMulInteger (v, mq, xz, wz)
  q = QLinearConv <pads=[1,1,1,1]> (x, s, xz, wq, s, wz, s, xz, bq)
  p = QLinearMatMul (v, s, xz, mq, s, wz, s, xz)
}}
"""


def test_integer_layers():
    model = make_model(INTEGER)
    conv = (16 * 8 * 9 * 10 * 10, 16 * 8 * 9)
    assert counts(model) == {
        "ConvInteger_0": conv,
        "MatMulInteger_0": (320, 320),
        "QLinearConv_0": (conv[0], conv[1] + 16),
        "QLinearMatMul_0": (320, 320),
    }
    assert "integer arithmetic" in layer_macs(model)["ConvInteger_0"]["macs"].note


# ---------------------------------------------------------------- decoded weights
MODEL = f"""
{HEADER}
g (float[N,3,8,8] x) => (float[N,5] y)
  <float[16,3,3,3] w, float[16] b, float[16,1,3,3] wd, float[16] bd, float[5,1024] w2, float[5] b2, float[1024,5] w3> {{
  c = Conv <pads=[1,1,1,1]> (x, w, b)
  r = Relu (c)
  d = Conv <pads=[1,1,1,1], group=16> (r, wd, bd)
  f = Flatten (d)
  y0 = Gemm <transB=1> (f, w2, b2)
  f2 = MatMul (f, w3)
  y = Add (y0, f2)
}}
"""
CALIBRATION = {"x": np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32)}


@pytest.fixture(scope="module")
def float_model() -> Model:
    return make_model(MODEL)


@pytest.mark.parametrize(
    "pipeline",
    [
        "quantize_weights(bits=8)",
        "quantize_weights(bits=4)",
        "cluster_weights(clusters=16)",
        "prune_weights(sparsity=0.5)",
        "quantize(mode=dynamic)",
        "quantize",
    ],
)
def test_decoded_weights_count_like_float(float_model, pipeline):
    expected = counts(float_model)
    assert len(expected) == 4
    out = run_passes(float_model, pipeline, calibration=CALIBRATION)
    got = counts(out)
    # quantize(mode=dynamic) renames layers (Conv_0 -> Conv_0_quant, Gemm_0 -> Gemm_0_MatMul_quant).
    got = {name.removesuffix("_quant").removesuffix("_MatMul"): c for name, c in got.items()}
    assert got == expected
    # ir.layers sees only float constant weights: the rewritten layers vanish from it.
    assert len(summarize(out).layers) < 4
    decoded = [layer for layer in weighted_layers(out) if layer.decode]
    if pipeline != "quantize(mode=dynamic)":
        assert len(decoded) >= 3
        assert "decoded" in layer_macs(out)[decoded[0].name]["macs"].note
    else:
        ops = sorted(layer.op for layer in weighted_layers(out))
        assert ops == ["ConvInteger"] * 2 + ["MatMulInteger"] * 2


# ---------------------------------------------------------------- shapes
def test_dynamic_spatial_dims_are_refused():
    model = make_model(
        f"""{HEADER}
        g (float[N,3,H,W] x) => (float[N,4,H,W] y) <float[4,3,1,1] w> {{ y = Conv (x, w) }}"""
    )
    with pytest.raises(DynamicShapeError, match="Conv_0.*dynamic dimension"):
        layer_macs(model)


def test_fixed_batch_is_kept():
    model = make_model(CONV.replace("float[N,", "float[2,"))
    assert counts(model, batch=4)["Conv_0"][0] == 2 * 115200


# ---------------------------------------------------------------- real models
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet"])
def test_architectures_agree_with_layer_view(arch_path, name):
    raw = Model.load(arch_path(name)).infer_shapes()
    for model in (raw, run_passes(raw, "fuse")):
        summary = summarize(model)
        per_layer = counts(model)
        total = model_macs(model)
        assert total["macs"].value == sum(m for m, _ in per_layer.values()) == summary.macs
        assert total["params"].value == sum(p for _, p in per_layer.values())
        assert per_layer == {layer.name: (layer.macs, layer.params) for layer in summary.layers}
        assert total["macs"].value > 100_000


def test_channel_shuffle_shapes_come_from_a_run(arch_path):
    # With a symbolic batch, ONNX shape inference loses the spatial dims after the
    # channel shuffle's Reshape; the copy run in onnxruntime recovers them.
    model = Model.load(arch_path("shufflenet_v2")).infer_shapes()
    assert summarize(model).macs is None
    assert resolve_batch(model, 1) is not model
    one, three = model_macs(model), model_macs(model, batch=3)
    assert len(layer_macs(model)) == len(summarize(model).layers)
    assert three["macs"].value == 3 * one["macs"].value > 0
    assert three["params"].value == one["params"].value
    # After the shuffle, hand-computed: a 1x1 conv 8 -> 8 and conv5 16 -> 32 on 8 x 8.
    per_layer = counts(model)
    assert per_layer["/stage/stage.1/branch2/branch2.0/branch2.0.0/Conv"] == (8 * 8 * 8 * 8, 64)
    assert per_layer["/conv5/conv5.0/Conv"] == (32 * 8 * 8 * 16, 32 * 16)
