"""Tests for activation capture: values equal an onnxruntime run exposing the same tensors,
batching, fixed-batch models, and CalibrationError on data that do not fit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tailor.ir import Model
from tailor.ir.activations import CalibrationError, capture, iter_batches
from tailor.passes.manager import check_model
from tests.helpers import make_model

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,6,6] x, float[N,4] t) => (float[N,4] y)
  <float[4,3,3,3] w, float[4] b, float[4,4] wf> {
  [conv] c = Conv <pads=[1,1,1,1]> (x, w, b)
  [relu] r = Relu (c)
  [pool] p = GlobalAveragePool (r)
  [flat] f = Flatten (p)
  [fc] h = MatMul (f, wf)
  [add] y = Add (h, t)
}
"""


@pytest.fixture(scope="module")
def model() -> Model:
    return make_model(TEXT)


def data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, 3, 6, 6)).astype(np.float32),
        "t": rng.standard_normal((n, 4)).astype(np.float32),
    }


def reference(
    model: Model, feeds: dict[str, np.ndarray], names: list[str]
) -> dict[str, np.ndarray]:
    """The tensors from onnxruntime, exposed as graph outputs by editing the proto directly."""
    proto = model.to_proto()
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feeds), strict=True))


NAMES = ["c", "r", "f", "h", "y"]


def test_capture_equals_onnxruntime(model):
    feeds = data(5)
    got = capture(model, feeds, NAMES)
    want = reference(model, feeds, NAMES)
    assert list(got) == NAMES
    for name in NAMES:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)
    assert got["c"].shape == (5, 4, 6, 6)


def test_capture_does_not_change_the_model(model):
    before = model.to_proto().SerializeToString()
    capture(model, data(2), ["c", "h"])
    assert model.to_proto().SerializeToString() == before
    assert [t.name for t in model.outputs] == ["y"]


@pytest.mark.parametrize("batch_size", [1, 3, 7, 64])
def test_batching_gives_the_same_values(model, batch_size):
    feeds = data(7, seed=1)
    full = reference(model, feeds, NAMES)
    sizes = []

    def reduce(name, value):
        if name == "r":
            sizes.append(len(value))
        return value

    got = capture(model, feeds, NAMES, batch_size=batch_size, reduce=reduce)
    expected_sizes = [min(batch_size, 7 - s) for s in range(0, 7, batch_size)]
    assert sizes == expected_sizes
    for name in NAMES:
        np.testing.assert_allclose(got[name], full[name], rtol=1e-6, atol=1e-6)


def test_reduce_bounds_what_is_kept(model):
    got = capture(
        model,
        data(10),
        ["c", "f"],
        batch_size=4,
        reduce=lambda name, v: v.mean(axis=(2, 3)) if name == "c" else v[:1],
    )
    assert got["c"].shape == (10, 4)
    assert got["f"].shape == (3, 4)  # one row per batch of 4, 4, 2


def test_inputs_and_outputs_can_be_captured(model):
    feeds = data(3)
    got = capture(model, feeds, ["x", "t", "y", "c"], batch_size=2)
    np.testing.assert_array_equal(got["x"], feeds["x"])
    np.testing.assert_array_equal(got["t"], feeds["t"])
    np.testing.assert_allclose(got["y"], reference(model, feeds, ["y"])["y"], rtol=1e-5, atol=1e-6)


def test_a_name_asked_twice_is_captured_once(model):
    got = capture(model, data(4), ["c", "c", "y", "y"], batch_size=3)
    assert list(got) == ["c", "y"]
    assert got["c"].shape == (4, 4, 6, 6)


def test_float64_and_integer_data_are_converted(model):
    feeds = data(2)
    as64 = {k: v.astype(np.float64) for k, v in feeds.items()}
    np.testing.assert_allclose(
        capture(model, as64, ["h"])["h"], capture(model, feeds, ["h"])["h"], rtol=1e-6
    )
    ints = {"x": np.ones((2, 3, 6, 6), np.uint8), "t": np.zeros((2, 4), np.int64)}
    assert capture(model, ints, ["y"])["y"].dtype == np.float32


def test_extra_arrays_are_ignored(model):
    feeds = {**data(2), "labels": np.arange(2)}
    assert capture(model, feeds, ["y"])["y"].shape == (2, 4)


def test_model_without_inferred_shapes():
    """A model loaded as is (no shape inference) still has its intermediates captured."""
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3] x) => (float[N,3] y) {
          a = Relu (x)
          b = Neg (a)
          y = Abs (b)
        }
        """
    )
    model = Model.load(proto)
    assert model.tensor("a").dtype is None
    x = np.linspace(-1, 1, 15, dtype=np.float32).reshape(5, 3)
    got = capture(model, {"x": x}, ["a", "b"], batch_size=2)
    np.testing.assert_array_equal(got["a"], np.maximum(x, 0))
    np.testing.assert_array_equal(got["b"], -np.maximum(x, 0))


@pytest.mark.parametrize(("batch", "n"), [(1, 5), (4, 8), (4, 10), (3, 2)])
def test_model_exported_with_a_fixed_batch(batch, n):
    """A static batch dimension is honoured whatever batch_size asks; a last partial
    batch is padded and trimmed."""
    model = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[{batch},3] x) => (float[{batch},2] y) <float[3,2] w> {{
          h = MatMul (x, w)
          y = Relu (h)
        }}
        """
    )
    x = np.random.default_rng(2).standard_normal((n, 3)).astype(np.float32)
    w = model.constant_value(model.nodes[0].inputs[1])
    seen = []
    got = capture(
        model, {"x": x}, ["h", "x"], batch_size=64, reduce=lambda k, v: seen.append(len(v)) or v
    )
    np.testing.assert_allclose(got["h"], x @ w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["x"], x)
    assert sum(seen) == 2 * n and max(seen) <= batch


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("feeds", "fragment"),
    [
        ({"x": np.zeros((2, 3, 6, 6), np.float32)}, "no array for model input 't' (arrays: x)"),
        ({}, "no array for model input 'x' (arrays: none)"),
        (
            {"x": np.zeros((2, 3, 6), np.float32), "t": np.zeros((2, 4), np.float32)},
            "calibration array 'x' has shape (2, 3, 6), the model expects rank 4",
        ),
        (
            {"x": np.zeros((2, 3, 7, 6), np.float32), "t": np.zeros((2, 4), np.float32)},
            "calibration array 'x' has shape (2, 3, 7, 6), the model expects ['N', 3, 6, 6]",
        ),
        (
            {"x": np.zeros((2, 3, 6, 6), np.float32), "t": np.zeros((3, 4), np.float32)},
            "different sample counts",
        ),
        (
            {"x": np.zeros((2, 3, 6, 6), np.float32), "t": np.zeros((2, 4), np.complex64)},
            "calibration array 't' has dtype complex64, the model expects float32",
        ),
        (
            {"x": np.full((2, 3, 6, 6), "a"), "t": np.zeros((2, 4), np.float32)},
            "calibration array 'x' has dtype <U1, the model expects float32",
        ),
        (
            {"x": np.zeros((0, 3, 6, 6), np.float32), "t": np.zeros((0, 4), np.float32)},
            "calibration data hold no samples",
        ),
    ],
)
def test_bad_data(model, feeds, fragment):
    with pytest.raises(CalibrationError) as info:
        capture(model, feeds, ["c"])
    assert fragment in str(info.value)


def test_float_data_for_an_integer_input_is_refused():
    """Token ids or indices must not be silently truncated from floats."""
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (int64[N,4] ids) => (float[N,4,2] y) <float[10,2] table> {
          y = Gather (table, ids)
        }
        """
    )
    with pytest.raises(CalibrationError, match="'ids' has dtype float64, the model expects int64"):
        capture(model, {"ids": np.full((2, 4), 1.7)}, ["y"])
    got = capture(model, {"ids": np.ones((2, 4), np.int32)}, ["y"])
    assert got["y"].shape == (2, 4, 2)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("nope", "cannot capture 'nope': no such tensor"), ("w", "'w': it is a constant")],
)
def test_bad_tensor_name(model, name, fragment):
    with pytest.raises(CalibrationError, match=fragment):
        capture(model, data(2), ["c", name])


def test_calibration_error_is_a_tailor_error():
    from tailor.errors import TailorError

    assert issubclass(CalibrationError, TailorError)


def test_iter_batches():
    arrays = {"a": np.arange(7), "b": np.arange(14).reshape(7, 2)}
    batches = list(iter_batches(arrays, 3))
    assert [len(b["a"]) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b["b"] for b in batches]), arrays["b"])
    assert list(iter_batches({}, 4)) == []
    with pytest.raises(CalibrationError, match="different sample counts"):
        list(iter_batches({"a": np.zeros(2), "b": np.zeros(3)}, 2))


def test_capture_model_stays_valid(model):
    capture(model, data(2), ["c"])
    check_model(model)
