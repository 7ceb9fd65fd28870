"""Tests for matmul_add_to_gemm: MatMul + bias Add into Gemm."""

from __future__ import annotations

import numpy as np
import pytest

from tailor.passes import PassContext
from tailor.passes.matmul_add_to_gemm import MatMulAddToGemm
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types, run_passes


def to_gemm(model, **config):
    return MatMulAddToGemm(**config).run(model.copy(), PassContext())


@pytest.mark.parametrize(
    ("bias_shape", "order"),
    [("5", "h, c"), ("1,5", "c, h"), ("1", "h, c"), ("", "h, c")],
)
def test_matmul_add_becomes_gemm(bias_shape, order):
    model = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,7] x) => (float[N,5] y) <float[7,5] w, float[{bias_shape}] c> {{
          h = MatMul (x, w)
          y = Add ({order})
        }}
        """
    )
    result = to_gemm(model)
    out = result.model
    assert op_types(out) == ["Gemm"]
    gemm = out.nodes[0]
    assert gemm.name == model.nodes[0].name  # the layer keeps its name
    assert [t.name for t in out.outputs] == ["y"]
    assert result.changes == [
        f"replaced {gemm.name} and {model.nodes[1].name} with Gemm {gemm.name}"
    ]
    assert_equivalent(model, out)
    assert_valid(out)


def test_mlp_through_pass_manager():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,7] x) => (float[N,3] y) <float[7,6] w1, float[6] b1, float[6,3] w2, float[3] b2> {
          h = MatMul (x, w1)
          a = Add (h, b1)
          r = Relu (a)
          o = MatMul (r, w2)
          y = Add (b2, o)
        }
        """
    )
    out = run_passes(model, "matmul_add_to_gemm")
    assert op_types(out) == ["Gemm", "Relu", "Gemm"]
    assert_equivalent(model, out)
    assert_valid(out)


@pytest.mark.parametrize(
    ("inputs", "body", "reason"),
    [
        # rank-3 activation: Gemm is 2-D only
        ("float[N,4,7] x", "h = MatMul (x, w)\n y = Add (h, c)", "2-D"),
        # weight computed at run time
        ("float[N,7] x, float[7,5] w", "h = MatMul (x, w)\n y = Add (h, c)", "constant matrix"),
        # the MatMul output is read twice
        ("float[N,7] x", "h = MatMul (x, w)\n y = Add (h, c)\n z = Relu (h)", "2 consumers"),
        # a bias that broadcasts along rows, not columns
        ("float[3,7] x", "h = MatMul (x, w)\n y = Add (h, c3)", "does not broadcast"),
        # the bias is computed at run time
        ("float[N,7] x, float[5] cv", "h = MatMul (x, w)\n y = Add (h, cv)", "not a constant"),
        # the MatMul output is a graph output
        ("float[N,7] x", "z = MatMul (x, w)\n y = Add (z, c)", "graph output"),
    ],
)
def test_must_not_apply(inputs, body, reason):
    outputs = "float[?,?] y" + (", float[?,?] z" if " z " in body or "z =" in body else "")
    weights = {"c3": np.ones((3, 1), np.float32), "c": np.ones(5, np.float32)}
    if "float[7,5] w" not in inputs:
        weights["w"] = np.ones((7, 5), np.float32)
    model = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g ({inputs}) => ({outputs}) {{
          {body}
        }}
        """,
        weights,
    )
    result = to_gemm(model)
    assert not result.modified
    assert op_types(result.model) == op_types(model)
    mm = next(n.name for n in model.nodes if n.op == "MatMul")
    assert reason in result.layer_notes[mm]["skipped"]["matmul_add_to_gemm"]
