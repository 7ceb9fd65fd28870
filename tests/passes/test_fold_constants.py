"""Tests for fold_constants: constant subgraphs, static shapes, what must stay computed."""

from __future__ import annotations

import numpy as np
import pytest

from tailor.ir import run_model
from tailor.passes import PassContext
from tailor.passes.fold_constants import FoldConstants
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types, run_passes


def fold(model, **config):
    return FoldConstants(**config).run(model.copy(), PassContext())


def check(model, expected_ops, **config):
    result = fold(model, **config)
    out = result.model
    assert sorted(op_types(out)) == sorted(expected_ops), result.changes
    assert [t.name for t in out.outputs] == [t.name for t in model.outputs]
    for batch in (1, 3):
        assert_equivalent(model, out, batch=batch)
    assert_valid(out)
    return result


def test_constant_subgraph_becomes_one_initializer():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,5] x) => (float[N,7] y) <float[7,5] w, float[1] k> {
          t = Transpose (w)
          c = Constant <value=float[1] {2.0}> ()
          m = Mul (t, c)
          s = Add (m, k)
          y = MatMul (x, s)
        }
        """
    )
    result = check(model, ["MatMul"])
    assert result.modified
    assert len(result.changes) == 4


def test_static_shape_folds_through_pass_manager():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3,4] x) => (float[2,3,4] y) {
          r = Relu (x)
          s = Shape (r)
          y = Reshape (x, s)
        }
        """
    )
    out = run_passes(model, "fold_constants")
    assert op_types(out) == ["Reshape"]  # the Relu only fed the Shape
    assert_equivalent(model, out)
    assert_valid(out)


def test_dynamic_batch_stays_dynamic():
    # x.view(x.size(0), -1): the batch dimension must not be frozen.
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,4,4] x) => (float[N,48] y, int64[4] z) <int64[1] minus1> {
          zero = Constant <value=int64 {0}> ()
          axes = Constant <value=int64[1] {0}> ()
          s = Shape (x)
          b = Gather <axis=0> (s, zero)
          bu = Unsqueeze (b, axes)
          shape = Concat <axis=0> (bu, minus1)
          y = Reshape (x, shape)
          z = Shape (x)
        }
        """,
        {"minus1": np.array([-1], np.int64)},
    )
    result = check(model, ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Shape"])
    assert all("Constant" in line for line in result.changes)  # only Constant nodes were lowered


def test_static_parts_of_a_dynamic_shape_fold():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[N,3,4,4] x) => (float[N,3,16] y, int64[1] h, int64[1] c) {
          s = Shape (x)
          i = Constant <value=int64[1] {2}> ()
          h = Gather <axis=0> (s, i)
          c = Shape <start=1, end=2> (x)
          t = Shape <start=-2> (x)
          p = ReduceProd <keepdims=1> (t)
          z = Constant <value=int64[1] {0}> ()
          shape = Concat <axis=0> (z, c, p)
          y = Reshape (x, shape)
        }
        """
    )
    result = check(model, ["Reshape"])
    out = result.model
    assert [np.asarray(t.values).tolist() for t in out.outputs[1:]] == [[4], [3]]


def test_cast_elision_of_graphsurgeon_is_not_used():
    # Cast(Mul(Cast(3 -> float), 0.5) -> int64) is 1; graphsurgeon's cast elision makes it 0.
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[N,3,8,8] x) => (int64[1] y, float[N,3,8,8] o) {
          s = Shape <start=1, end=2> (x)
          f = Cast <to=1> (s)
          half = Constant <value=float[1] {0.5}> ()
          m = Mul (f, half)
          y = Cast <to=7> (m)
          o = Relu (x)
        }
        """
    )
    out = check(model, ["Relu"]).model
    assert np.asarray(out.outputs[0].values).tolist() == [1]


def test_quantize_dequantize_and_random_stay():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[2,2] r) <int8[4,3,1,1] wq, float ws, int8 wz, float[4] b> {
          w = DequantizeLinear (wq, ws, wz)
          y = Conv (x, w, b)
          r = RandomNormal <shape=[2,2]> ()
        }
        """,
        {"ws": np.float32(0.05), "wz": np.int8(0)},
    )
    result = fold(model)
    assert sorted(op_types(result.model)) == ["Conv", "DequantizeLinear", "RandomNormal"]
    assert not result.modified
    assert_valid(result.model)


@pytest.mark.parametrize(("max_bytes", "folded"), [(64, False), (16 << 20, True)])
def test_size_cap(max_bytes, folded):
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,64] x) => (float[N,64] y) <float[1] k, int64[2] shape> {
          big = Expand (k, shape)
          y = MatMul (x, big)
        }
        """,
        {"k": np.array([0.5], np.float32), "shape": np.array([64, 64], np.int64)},
    )
    result = check(model, ["MatMul"] if folded else ["Expand", "MatMul"], max_bytes=max_bytes)
    assert result.modified is folded


def test_constant_graph_output_keeps_its_name():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4] x) => (float[N,4] y, float[4] z) <float[4] k> {
          y = Relu (x)
          z = Neg (k)
        }
        """
    )
    out = check(model, ["Relu"]).model
    feeds = {"x": np.ones((2, 4), np.float32)}
    assert np.allclose(run_model(out, feeds)["z"], -model.constant_value(model.tensor("k")))


def test_selector_limits_folding():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4] x) => (float[N,4] y) <float[4] k> {
          a = Neg (k)
          y = Add (x, a)
        }
        """
    )
    assert not fold(model, layers="!op:Neg").modified
    assert op_types(fold(model, layers="op:Neg").model) == ["Add"]


def test_scalar_gather_of_a_static_dim_folds():
    # torch's x.size(1) exports as Gather(Shape(x), scalar index); its folded value must be
    # a 0-d array (graphsurgeon cannot copy a Constant holding a numpy scalar).
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,4,4] x) => (float[N,3,16] y) {
          s = Shape (x)
          one = Constant <value=int64 {1}> ()
          c = Gather <axis=0> (s, one)
          axes = Constant <value=int64[1] {0}> ()
          cu = Unsqueeze (c, axes)
          z = Constant <value=int64[1] {0}> ()
          m = Constant <value=int64[1] {-1}> ()
          shape = Concat <axis=0> (z, cu, m)
          y = Reshape (x, shape)
        }
        """
    )
    check(model, ["Reshape"])
