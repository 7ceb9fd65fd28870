"""Tests for quantize_weights: int8 through Cast/Mul (folded by onnxruntime at load) or
DequantizeLinear (`decode=dequantize_linear`, opset >= 13), packed 4-bit codes, the channel axis of every layer kind, weights it must not
touch, bytes saved and errors reported.

Exactness of the decode: the rewritten model must match, to 1e-5, the original model with
each weight replaced by its numpy-decoded codes (:func:`quantize_array`), so a wrong
nibble order, axis or zero point anywhere in the ONNX decode subgraph shows.
"""

from __future__ import annotations

import numpy as np
import pytest

from tailor.errors import ParameterError
from tailor.ir import Model, compare
from tailor.ir.layers import layer_weight
from tailor.passes import PassContext
from tailor.passes._storage import channel_axis
from tailor.passes.quantize_weights import QuantizeWeights, quantize_array
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types, run_passes

MODEL = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[N,3,8,8] x) => (float[N,5] y) <float[32,3,3,3] w, float[32] b, float[5,2048] w2, float[5] b2, float[2048,5] w3> {{
  c = Conv <pads=[1,1,1,1]> (x, w, b)
  r = Relu (c)
  f = Flatten (r)
  y0 = Gemm <transB=1> (f, w2, b2)
  f2 = MatMul (f, w3)
  y = Add (y0, f2)
}}
"""
CALIBRATION = {"x": np.random.default_rng(5).standard_normal((16, 3, 8, 8)).astype(np.float32)}


def quantize(model: Model, data=None, **config):
    return QuantizeWeights(**config).run(model.copy(), PassContext(calibration=data))


def decoded_reference(model: Model, bits: int, per_channel: bool, symmetric: bool) -> Model:
    """The model with every layer weight replaced by its numpy-decoded codes."""
    ref = model.copy()
    for node in ref.nodes:
        found = layer_weight(ref, node)
        if found is None:
            continue
        index, w = found
        axis = channel_axis(node, index, w.ndim) if per_channel else None
        codes, scale, zero = quantize_array(w, bits, axis, symmetric)
        node.inputs[index] = ref.add_constant("ref", ((codes - zero) * scale).astype(w.dtype))
    return ref


def weight_decoders(model: Model) -> dict[str, list[str]]:
    """Per layer, the ops from its weight back to the stored initializer."""
    found = {}
    for node in model.nodes:
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        chain, t = [], node.inputs[1]
        while (producer := model.producer(t)) is not None:
            chain.append(producer.op)
            t = producer.inputs[0]
        found[node.name] = chain
    return found


def test_int8_cast_mul_structure_is_folded_by_onnxruntime():
    model = make_model(MODEL.format(opset=13))
    result = quantize(model)
    out = result.model
    assert result.modified
    # Every layer reads its weight from Mul(Cast(int8 codes), scale): constants only, which
    # onnxruntime folds into a float weight when the session is created.
    assert weight_decoders(out) == {n: ["Mul", "Cast"] for n in ("Conv_0", "Gemm_0", "MatMul_0")}
    for node in out.nodes:
        if node.op == "Cast":
            assert out.constant_value(node.inputs[0]).dtype == np.int8
    assert "via Cast/Sub/Mul" in result.changes[0]
    assert_equivalent(decoded_reference(model, 8, True, True), out)
    assert compare(model, out).max_rel < 2e-2
    assert_valid(out)


def test_int8_dequantize_linear_structure():
    model = make_model(MODEL.format(opset=13))
    result = quantize(model, decode="dequantize_linear")
    out = result.model
    # Every layer reads its weight from a DequantizeLinear over an int8 initializer.
    assert weight_decoders(out) == {
        n: ["DequantizeLinear"] for n in ("Conv_0", "Gemm_0", "MatMul_0")
    }
    assert op_types(out).count("DequantizeLinear") == 3
    assert_equivalent(decoded_reference(model, 8, True, True), out)
    assert compare(model, out).max_rel < 2e-2
    assert_valid(out)


@pytest.mark.parametrize("opset", [9, 11, 13])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("decode", ["arithmetic", "dequantize_linear"])
def test_decode_matches_numpy(opset, bits, symmetric, per_channel, decode):
    model = make_model(MODEL.format(opset=opset))
    config = {"bits": bits, "symmetric": symmetric, "per_channel": per_channel, "decode": decode}
    out = quantize(model, **config).model
    uses_dq = decode == "dequantize_linear" and bits == 8 and opset >= (13 if per_channel else 10)
    assert ("DequantizeLinear" in op_types(out)) == uses_dq
    if bits == 4:  # nibbles unpacked with Mod, or Div/Mul/Sub before opset 10
        assert ("Mod" in op_types(out)) == (opset >= 10)
    assert_equivalent(decoded_reference(model, bits, per_channel, symmetric), out)
    assert compare(model, out).max_rel < (3e-2 if bits == 8 else 0.6)
    assert_valid(out)


def test_errors_on_calibration_data_and_four_bits_smaller():
    model = make_model(MODEL.format(opset=17))
    eight = quantize(model, CALIBRATION)
    four = quantize(model, CALIBRATION, bits=4)
    for name in ("Conv_0", "Gemm_0", "MatMul_0"):
        assert 0 < eight.layer_notes[name]["rel_error"] < 2e-2
        assert eight.layer_notes[name]["rel_error"] < four.layer_notes[name]["rel_error"] < 0.3
        data = {n: r.layer_notes[name]["bytes_after"] - r.layer_notes[name]["graph_bytes"]
                for n, r in (("four", four), ("eight", eight))}  # fmt: skip
        assert data["four"] < data["eight"]
    assert "output rel. error" in eight.changes[0]
    # Gemm weight: 10,240 codes in 5,120 bytes plus 5 scales, and the unpacking nodes.
    note = four.layer_notes["Gemm_0"]
    assert note["bytes_after"] - note["graph_bytes"] < 5120 + 5 * 4 + 64


def test_asymmetric_keeps_zeros_exact():
    w = np.random.default_rng(0).uniform(0.1, 1.0, (6, 4)).astype(np.float32)
    w[:, 1] = 0.0
    codes, scale, zero = quantize_array(w, 8, 0, symmetric=False)
    decoded = (codes - zero) * scale
    assert np.all(decoded[:, 1] == 0.0)
    assert np.abs(decoded - w).max() <= scale.max() / 2 + 1e-7


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("decode", ["arithmetic", "dequantize_linear"])
def test_conv_transpose_and_weight_first_matmul(group, decode):
    cout = 3 * group
    model = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,16,5,5] x, float[N,16,2] z) => (float[N,{cout},10,10] y, float[N,8,2] v) <float[16,3,2,2] w, float[8,16] m> {{
          y = ConvTranspose <strides=[2,2], group={group}> (x, w)
          v = MatMul (m, z)
        }}
        """
    )
    out = quantize(model, decode=decode).model
    if decode == "dequantize_linear":
        dq_axes = {
            n.outputs[0].outputs[0].op: n.attrs["axis"]
            for n in out.nodes
            if n.op == "DequantizeLinear"
        }
        assert dq_axes == {"ConvTranspose": 1, "MatMul": 0}
    else:  # the scale broadcasts along the output channel axis
        scales = {
            n.outputs[0].outputs[0].op: out.constant_value(n.inputs[1]).shape
            for n in out.nodes
            if n.op == "Mul"
        }
        assert scales == {"ConvTranspose": (1, 3, 1, 1), "MatMul": (8, 1)}
    assert_equivalent(decoded_reference(model, 8, True, True), out)
    assert_valid(out)


def test_selector_and_shared_weights_are_left_alone():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,64] x) => (float[N,64] y, float[N,64] z) <float[64,64] w, float[64,64] v> {
          h = MatMul (x, w)
          y = MatMul (h, v)
          z = Gemm (x, v)
        }
        """
    )
    # v is read by MatMul_1 and Gemm_0; selecting only MatMul_1 must leave v float.
    result = quantize(model, layers="MatMul_0|MatMul_1")
    out = result.model
    assert weight_decoders(out)["MatMul_0"] == ["Mul", "Cast"]
    for name in ("MatMul_1", "Gemm_0"):
        assert out.constant_value(out.node(name).inputs[1]).dtype == np.float32
    assert "Gemm_0" in result.layer_notes["MatMul_1"]["skipped"]
    # Selecting every reader quantizes the shared weight once.
    out = quantize(model).model
    assert op_types(out).count("Cast") == 2
    assert out.node("MatMul_1").inputs[1] is out.node("Gemm_0").inputs[1]
    assert_valid(out)


def test_must_not_grow_a_tiny_weight():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,1] x) => (float[N,2] y) <float[1,2] w> {
          y = MatMul (x, w)
        }
        """
    )
    result = quantize(model)
    assert not result.modified
    assert op_types(result.model) == ["MatMul"]
    assert "not fewer than 8" in result.layer_notes["MatMul_0"]["skipped"]


def test_unsupported_bits_and_pipeline_text():
    with pytest.raises(ParameterError, match="bits=6"):
        QuantizeWeights(bits=6)
    model = make_model(MODEL.format(opset=13))
    out = run_passes(model, "quantize_weights(bits=4,per_channel=false)")
    assert "DequantizeLinear" not in op_types(out)
    assert compare(model, out).max_rel < 0.6


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3", "vgg"])
def test_architectures(arch_path, name):
    model = Model.load(arch_path(name))
    result = run_passes(model, "fuse,quantize_weights")
    assert_valid(result)
    assert [t.name for t in result.outputs] == ["logits"]
    assert compare(model, result).max_rel < 2e-2
