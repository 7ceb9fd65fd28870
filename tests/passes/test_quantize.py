"""Tests for quantize: static QDQ and dynamic quantization through onnxruntime.quantization,
per-layer selection (a layer left out stays float), opset upgrades, calibration methods,
bias correction, errors reported, no files left behind, and the reference architectures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from tailor.errors import ParameterError, PassError
from tailor.ir import Model, compare, run_model
from tailor.passes import PassContext
from tailor.passes.quantize import Quantize
from tests.helpers import ARCHITECTURE_NAMES, assert_valid, make_model, op_types, run_passes

MODEL = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[N,3,8,8] x) => (float[N,5] y) <float[16,3,3,3] w, float[16] b, float[16,1,3,3] wd, float[5,1024] w2, float[5] b2, float[1024,5] w3> {{
  c = Conv <pads=[1,1,1,1]> (x, w, b)
  r = Relu (c)
  d = Conv <pads=[1,1,1,1], group=16> (r, wd)
  f = Flatten (d)
  y0 = Gemm <transB=1> (f, w2, b2)
  f2 = MatMul (f, w3)
  y = Add (y0, f2)
}}
"""
LAYERS = ("Conv_0", "Conv_1", "Gemm_0", "MatMul_0")
RNG = np.random.default_rng(7)
CALIBRATION = {"x": RNG.standard_normal((32, 3, 8, 8)).astype(np.float32)}
HELD_OUT = {"x": RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)}


def quantize(model: Model, data=CALIBRATION, **config):
    return Quantize(**config).run(model.copy(), PassContext(calibration=data))


def weight_source(model: Model, layer: str) -> str:
    """What feeds the layer's weight: the producing op, or `float` for an initializer."""
    t = model.node(layer).inputs[1]
    producer = model.producer(t)
    if producer is not None:
        return producer.op
    return "float" if model.constant_value(t).dtype == np.float32 else "other"


@pytest.fixture(scope="module")
def model() -> Model:
    return make_model(MODEL.format(opset=13))


def test_static_qdq_structure_and_errors(model):
    result = quantize(model)
    out = result.model
    assert result.modified
    assert {n.domain for n in out.nodes} == {""}
    for name in LAYERS:
        assert weight_source(out, name) == "DequantizeLinear"
        dq = out.producer(out.node(name).inputs[1])
        assert out.constant_value(dq.inputs[0]).dtype == np.int8
        note = result.layer_notes[name]
        assert 0 < note["rel_error"] < 0.05  # measured on the calibration data
        assert note["quantized"].startswith("QDQ int8")
    assert op_types(out).count("QuantizeLinear") >= 4
    assert [t.name for t in out.outputs] == ["y"]
    assert out.outputs[0].shape[0] == "N"
    assert all("output rel. error" in line for line in result.changes)
    assert compare(model, out, HELD_OUT).max_rel < 0.05
    assert run_model(out, {"x": HELD_OUT["x"][:3]})["y"].shape == (3, 5)
    assert_valid(out)


def test_layer_left_out_stays_float(model):
    result = quantize(model, layers="!Conv_1")
    out = result.model
    assert weight_source(out, "Conv_1") == "float"
    assert np.array_equal(
        out.constant_value(out.node("Conv_1").inputs[1]),
        model.constant_value(model.node("Conv_1").inputs[1]),
    )
    assert "Conv_1" not in result.layer_notes
    for name in ("Conv_0", "Gemm_0", "MatMul_0"):
        assert weight_source(out, name) == "DequantizeLinear"
    # Only the convolutions: the Gemm and the MatMul stay float.
    out = quantize(model, layers="op:Conv").model
    assert [weight_source(out, n) for n in LAYERS] == ["DequantizeLinear"] * 2 + ["float"] * 2
    assert_valid(out)


def test_selector_without_layers_changes_nothing(model):
    result = quantize(model, layers="op:Relu")
    assert not result.modified
    assert op_types(result.model) == op_types(model)


def test_int8_needs_calibration_data(model):
    with pytest.raises(PassError, match="needs calibration data.*--data"):
        quantize(model, data=None)
    with pytest.raises(PassError, match="no array for model input 'x'"):
        quantize(model, data={"input": CALIBRATION["x"]})


def test_dynamic(model):
    result = quantize(model, data=None, mode="dynamic")
    out = result.model
    ops = op_types(out)
    assert ops.count("ConvInteger") == 2 and ops.count("MatMulInteger") == 2
    assert "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops
    assert {n.domain for n in out.nodes} == {""}
    for name in LAYERS:
        note = result.layer_notes[name]
        assert 0 < note["weight_rel_error"] < 1e-2  # no data: weight-space error
    assert [t.name for t in out.outputs] == ["y"]
    assert compare(model, out, HELD_OUT).max_rel < 0.05
    assert_valid(out)
    # With data, the per-layer output errors are measured.
    result = quantize(model, mode="dynamic", layers="!MatMul_0")
    assert 0 < result.layer_notes["Gemm_0"]["rel_error"] < 0.05
    assert "MatMul_0" not in result.layer_notes
    assert weight_source(result.model, "MatMul_0") == "float"


def test_opset_raised_where_needed():
    old = make_model(MODEL.format(opset=11))
    result = quantize(old)
    assert result.model.opset == 13
    assert result.changes[0] == "raised the opset from 11 to 13 for quantization"
    assert_valid(result.model)
    result = quantize(old, per_channel=False)
    assert result.model.opset == 11
    assert_valid(result.model)
    # 16-bit activations need opset 21, and then stay in the standard domain.
    result = quantize(old, activation_type="uint16", weight_type="int16")
    assert result.model.opset == 21
    assert {n.domain for n in result.model.nodes} == {""}
    assert all(result.layer_notes[n]["rel_error"] < 1e-3 for n in LAYERS)
    assert_valid(result.model)


def test_calibration_methods_differ(model):
    def scales(result):
        out = result.model
        return {
            n.inputs[0].name: float(out.constant_value(n.inputs[1]))
            for n in out.nodes
            if n.op == "QuantizeLinear"
        }

    found = {m: scales(quantize(model, calibration=m)) for m in ("minmax", "entropy", "percentile")}
    # Entropy clips outliers: with 512 histogram bins it picks ranges inside MinMax's.
    assert found["entropy"] != found["minmax"]
    assert all(found["entropy"][t] <= found["minmax"][t] * 1.001 for t in found["minmax"])
    assert found["percentile"] != found["minmax"]


def test_bias_correction_adds_and_shifts_biases(model):
    plain = quantize(model, per_channel=False, bias_correction=False)
    corrected = quantize(model, per_channel=False)
    out = corrected.model
    # Conv_1 had no bias: it gets an int32 one through a DequantizeLinear.
    bias = out.node("Conv_1").inputs[2]
    assert out.producer(bias).op == "DequantizeLinear"
    assert out.constant_value(out.producer(bias).inputs[0]).dtype == np.int32
    assert len(plain.model.node("Conv_1").inputs) == 2
    for name in ("Conv_0", "Conv_1", "Gemm_0"):
        assert corrected.layer_notes[name]["bias_correction"] > 0
    assert "no bias input" in corrected.layer_notes["MatMul_0"]["bias_correction"]
    # The correction removes the mean output shift: the outputs' error drops.
    assert (
        compare(model, out, CALIBRATION).max_rel < compare(model, plain.model, CALIBRATION).max_rel
    )
    assert_valid(out)


def test_conv_output_that_is_a_graph_output_is_not_clipped():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,4,8,8] c) <float[4,3,3,3] w, float[4] b> {
          c = Conv <pads=[1,1,1,1]> (x, w, b)
          y = Relu (c)
        }
        """
    )
    out = quantize(model).model
    # onnxruntime would give c the Relu's range [0, max] and clip its negative half.
    cmp = compare(model, out, CALIBRATION)
    assert cmp.per_output["c"][1] < 0.05 and cmp.per_output["y"][1] < 0.05
    assert [t.name for t in out.outputs] == ["y", "c"]


def test_no_files_left_behind(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = set(Path(tempfile.gettempdir()).iterdir())
    run_passes(model, "quantize(calibration=percentile)", calibration=CALIBRATION)
    run_passes(model, "quantize(mode=dynamic)")
    assert list(tmp_path.iterdir()) == []
    assert {p for p in Path(tempfile.gettempdir()).iterdir() if "quant" in p.name} <= before


def test_parameters():
    with pytest.raises(ParameterError, match="int8 or uint8"):
        Quantize(mode="dynamic", weight_type="int16")
    with pytest.raises(ParameterError, match="not one of"):
        Quantize(calibration="kl")


NAMES = ARCHITECTURE_NAMES


@pytest.mark.parametrize("name", NAMES)
def test_architectures(arch_path, name):
    fused = run_passes(Model.load(arch_path(name)), "fuse")
    rng = np.random.default_rng(0)
    data = {"input": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)}
    feeds = {"input": rng.standard_normal((3, 3, 32, 32)).astype(np.float32)}
    for pipeline in ("quantize", "quantize(mode=dynamic)"):
        out = run_passes(fused, pipeline, calibration=data)
        assert_valid(out)
        assert [t.name for t in out.outputs] == ["logits"]
        assert run_model(out, feeds)["logits"].shape == (3, 10)
        integer = {"DequantizeLinear", "ConvInteger", "MatMulInteger"} & set(op_types(out))
        assert integer, f"{pipeline} quantized nothing in {name}"
