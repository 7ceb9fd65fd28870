"""Tests for the empirical bias correction shared by the low-rank passes and quantize
(passes/_bias.py): on tiny graphs whose weights were perturbed, the per-channel mean of
each corrected output matches the reference on the calibration data, whatever holds the
bias (a float constant, none, a Gemm's C with beta, an int32 behind a DequantizeLinear,
the Add after a MatMul, or a new Add), and nothing outside the corrected layer changes.
"""

from __future__ import annotations

import numpy as np
import pytest

from tailor.ir import Model, run_model
from tailor.passes._bias import BiasShift, add_channel_shift, correct_bias
from tests.helpers import assert_valid, make_model, op_types


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def perturb(model: Model, node_name: str, scale: float = 0.8, shift: float = 0.05) -> Model:
    """A copy whose layer weight is `w * scale + shift` (a biased error, like rounding)."""
    out = model.copy()
    node = out.node(node_name)
    w = out.constant_value(node.inputs[1])
    node.inputs[1] = out.add_constant("w_perturbed", (w * scale + shift).astype(w.dtype))
    return out


def channel_mean_error(before: Model, after: Model, x, out: str = "y", axis: int = 1):
    y0 = run_model(before, x)[out].astype(np.float64)
    y1 = run_model(after, x)[out].astype(np.float64)
    other = tuple(i for i in range(y0.ndim) if i != axis % y0.ndim)
    return (y0 - y1).mean(axis=other)


CONV = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,4,6,6] x) => (float[N,8,6,6] y) <float[8,4,3,3] w{decl}> {{
  y = Conv <pads=[1,1,1,1]> (x, w{use})
}}
"""


@pytest.mark.parametrize("bias", [True, False])
def test_perturbed_conv_mean_error_is_zero_after_correction(bias):
    text = CONV.format(decl=", float[8] b" if bias else "", use=", b" if bias else "")
    before = make_model(text)
    after = perturb(before, "Conv_0")
    x = {"x": np.abs(randn(16, 4, 6, 6, seed=1))}  # after a ReLU: the error has a mean
    error = channel_mean_error(before, after, x)
    assert np.abs(error).max() > 0.1
    shifts = correct_bias(before, after, {"y": "y"}, x)
    shift = shifts["y"]
    assert isinstance(shift, BiasShift) and shift.node == "Conv_0" and shift.axis == -3
    np.testing.assert_allclose(shift.delta, error, atol=1e-5)
    assert shift.added_params == (0 if bias else 8)  # a bias is created where none was
    np.testing.assert_allclose(channel_mean_error(before, after, x), 0.0, atol=1e-5)
    assert op_types(after) == ["Conv"] and len(after.node("Conv_0").inputs) == 3
    assert_valid(after)


def test_only_the_first_max_samples_are_used():
    before = make_model(CONV.format(decl=", float[8] b", use=", b"))
    after = perturb(before, "Conv_0")
    x = {"x": np.concatenate([randn(8, 4, 6, 6, seed=1), 5 + randn(8, 4, 6, 6, seed=2)])}
    correct_bias(before, after, {"y": "y"}, x, max_samples=8)
    np.testing.assert_allclose(channel_mean_error(before, after, {"x": x["x"][:8]}), 0, atol=1e-5)
    assert np.abs(channel_mean_error(before, after, {"x": x["x"][8:]})).max() > 0.1


def test_shared_bias_is_replaced_for_one_reader_only():
    before = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4,6,6] x) => (float[N,8,6,6] y, float[N,8,6,6] z) <float[8,4,3,3] w, float[8,4,3,3] v, float[8] b> {
          y = Conv <pads=[1,1,1,1]> (x, w, b)
          z = Conv <pads=[1,1,1,1]> (x, v, b)
        }
        """
    )
    after = perturb(before, "Conv_0")
    x = {"x": randn(8, 4, 6, 6, seed=3)}
    correct_bias(before, after, {"y": "y"}, x)
    assert after.node("Conv_1").inputs[2].name == "b"
    np.testing.assert_array_equal(
        after.constant_value(after.node("Conv_1").inputs[2]),
        before.constant_value(before.node("Conv_1").inputs[2]),
    )
    np.testing.assert_allclose(channel_mean_error(before, after, x), 0.0, atol=1e-5)
    np.testing.assert_array_equal(run_model(before, x)["z"], run_model(after, x)["z"])


@pytest.mark.parametrize("c_shape", ["5", "1,5"])
def test_gemm_beta_is_folded_into_the_new_c(c_shape):
    before = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,6] x) => (float[N,5] y) <float[5,6] w, float[{c_shape}] c> {{
          y = Gemm <transB=1, beta=0.5> (x, w, c)
        }}
        """
    )
    after = perturb(before, "Gemm_0")
    x = {"x": np.abs(randn(32, 6, seed=4))}
    shift = correct_bias(before, after, {"y": "y"}, x)["y"]
    node = after.node("Gemm_0")
    assert node.attrs["beta"] == 1.0 and shift.axis == -1
    assert after.constant_value(node.inputs[2]).shape == tuple(int(d) for d in c_shape.split(","))
    np.testing.assert_allclose(channel_mean_error(before, after, x, axis=-1), 0.0, atol=1e-5)
    assert_valid(after)


# ---------------------------------------------------------------------- QDQ layers
def qdq_conv(bias: bool) -> tuple[Model, Model]:
    """A float Conv and its QDQ form (int8 activations and per-channel weights, int32 bias
    at the input scale times the weight scale, as onnxruntime.quantization writes it)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    ws = (np.abs(w).reshape(8, -1).max(axis=1) / 127).astype(np.float32)
    xs = np.float32(0.03)
    bs = (xs * ws).astype(np.float32)
    weights = {
        "w": w,
        "wq": np.rint(w / ws[:, None, None, None]).astype(np.int8),
        "ws": ws,
        "xs": np.array(xs),
        "xz": np.array(0, np.int8),
        "b": b,
        "bq": np.rint(b / bs).astype(np.int32),
        "bs": bs,
    }
    b_in = ", b" if bias else ""
    bq_in = ", bd" if bias else ""
    float_model = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4,6,6] x) => (float[N,8,6,6] y) {{
          y = Conv <pads=[1,1,1,1]> (x, w{b_in})
        }}
        """,
        {k: weights[k] for k in ("w", "b")} if bias else {"w": w},
    )
    qdq = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4,6,6] x) => (float[N,8,6,6] y) {{
          xq = QuantizeLinear (x, xs, xz)
          xd = DequantizeLinear (xq, xs, xz)
          wd = DequantizeLinear <axis=0> (wq, ws)
          {"bd = DequantizeLinear <axis=0> (bq, bs)" if bias else ""}
          y = Conv <pads=[1,1,1,1]> (xd, wd{bq_in})
        }}
        """,
        {
            k: v
            for k, v in weights.items()
            if k not in ("w", "b") and (bias or k not in ("bq", "bs"))
        },
    )
    return float_model, qdq


@pytest.mark.parametrize("bias", [True, False])
def test_qdq_conv_keeps_an_int32_bias(bias):
    before, after = qdq_conv(bias)
    x = {"x": np.abs(randn(16, 4, 6, 6, seed=6))}  # non-negative: rounding biases the mean
    error = np.abs(channel_mean_error(before, after, x)).max()
    shift = correct_bias(before, after, {"y": "y"}, x, insert_add=False)["y"]
    assert isinstance(shift, BiasShift)
    conv = after.node("Conv_0")
    dq = after.producer(conv.inputs[2])
    assert dq.op == "DequantizeLinear" and dq.attrs.get("axis") == 0
    q = after.constant_value(dq.inputs[0])
    scale = after.constant_value(dq.inputs[1])
    assert q.dtype == np.int32
    # The scale is the input scale times the weight scale, so onnxruntime can fuse it.
    ws = after.constant_value(after.producer(conv.inputs[1]).inputs[1])
    np.testing.assert_allclose(scale, np.float32(0.03) * ws, rtol=1e-6)
    if bias:
        assert dq.inputs[1].name == "bs"
    # Left: the error of rounding the shift to the int32 bias's step.
    assert error > 5 * scale.max()
    np.testing.assert_allclose(channel_mean_error(before, after, x), 0.0, atol=scale.max())
    assert shift.added_params == (0 if bias else 8)
    assert op_types(after).count("Add") == 0
    assert_valid(after)


def test_without_a_bias_input_insert_add_false_gives_the_reason():
    before = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,T,20] x) => (float[N,T,12] y) <float[20,12] w> { y = MatMul (x, w) }
        """
    )
    after = perturb(before, "MatMul_0")
    found = correct_bias(before, after, {"y": "y"}, {"x": randn(4, 3, 20)}, insert_add=False)
    assert found == {"y": "MatMul has no bias input"}
    assert op_types(after) == ["MatMul"]
    assert add_channel_shift(after, "y", np.ones(12), -1, 3, insert_add=False) == (
        "MatMul has no bias input"
    )


# ---------------------------------------------------------------------- where else a shift goes
def test_correct_bias_on_a_matmul_graph_output_inserts_an_add():
    before = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,T,20] x) => (float[N,T,12] y) <float[20,12] w> { y = MatMul (x, w) }
        """
    )
    after = before.copy()
    w = after.constant_value(after.nodes[0].inputs[1])
    after.nodes[0].inputs[1] = after.add_constant("w_perturbed", (w * 0.8).astype(np.float32))
    x = {"x": np.abs(randn(16, 5, 20))}
    shifts = correct_bias(before, after, {"y": "y"}, x)
    assert op_types(after) == ["MatMul", "Add"]
    assert [t.name for t in after.outputs] == ["y"]
    assert shifts["y"].axis == -1 and shifts["y"].added_params == 12
    y0, y1 = run_model(before, x)["y"], run_model(after, x)["y"]
    np.testing.assert_allclose((y0 - y1).mean(axis=(0, 1)), 0.0, atol=1e-4)
    assert_valid(after)


def test_correct_bias_goes_downstream_in_order():
    # Two perturbed layers in a row: the second is measured after the first is corrected,
    # so the mean of the final output matches.
    text = """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,8,6,6] x) => (float[N,8,6,6] y) <float[8,8,3,3] w1, float[8] b1, float[8,8,3,3] w2> {
          h = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu (h)
          y = Conv <pads=[1,1,1,1]> (r, w2)
        }
        """
    before = make_model(text)
    after = before.copy()
    for node in after.nodes:
        if node.op == "Conv":
            w = after.constant_value(node.inputs[1])
            node.inputs[1] = after.add_constant("p", (w * 0.7 + 0.05).astype(np.float32))
    x = {"x": randn(12, 8, 6, 6)}
    shifts = correct_bias(before, after, {"h": "h", "y": "y"}, x)
    assert set(shifts) == {"h", "y"}
    assert len(after.nodes[-1].inputs) == 3  # a bias was created on the second Conv
    y0, y1 = run_model(before, x)["y"], run_model(after, x)["y"]
    np.testing.assert_allclose((y0 - y1).mean(axis=(0, 2, 3)), 0.0, atol=1e-3)
    assert_valid(after)
