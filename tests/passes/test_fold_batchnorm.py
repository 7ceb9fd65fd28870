"""Tests for fold_batchnorm: Conv, ConvTranspose (grouped) and Gemm followed by BatchNormalization."""

from __future__ import annotations

import numpy as np
import pytest

from tailor.passes import PassContext
from tailor.passes.fold_batchnorm import FoldBatchNorm
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types, run_passes


def bn(c: int, prefix: str = "", seed: int = 1) -> dict[str, np.ndarray]:
    """BatchNormalization parameters with a positive variance."""
    rng = np.random.default_rng(seed)
    return {
        f"{prefix}s": rng.uniform(0.5, 2.0, c).astype(np.float32),
        f"{prefix}b": rng.standard_normal(c).astype(np.float32),
        f"{prefix}mu": rng.standard_normal(c).astype(np.float32),
        f"{prefix}var": rng.uniform(0.1, 3.0, c).astype(np.float32),
    }


def fold(model, **config):
    return FoldBatchNorm(**config).run(model.copy(), PassContext())


CONV_BN = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[4,3,3,3] w{bias_decl}, float[4] s, float[4] b, float[4] mu, float[4] var> {{
  c = Conv <pads=[1,1,1,1]> (x, w{bias_use})
  y = BatchNormalization <epsilon=0.001> (c, s, b, mu, var)
}}
"""


@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_bn_as_graph_output(with_bias):
    text = CONV_BN.format(
        bias_decl=", float[4] cb" if with_bias else "", bias_use=", cb" if with_bias else ""
    )
    model = make_model(text, bn(4))
    result = fold(model)
    assert result.modified and result.changes == ["folded BatchNormalization_0 into Conv_0"]
    out = result.model
    assert op_types(out) == ["Conv"]
    assert [t.name for t in out.outputs] == ["y"]  # the BN's output name survives
    assert len(out.nodes[0].inputs) == 3
    assert_equivalent(model, out)
    assert_valid(out)


def test_conv_bn_relu_through_pass_manager():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,8,8] x) => (float[N,8,4,4] y) <float[8,3,3,3] w, float[8] cb, float[8] s, float[8] b, float[8] mu, float[8] var> {
          c = Conv <pads=[1,1,1,1], strides=[2,2]> (x, w, cb)
          n = BatchNormalization (c, s, b, mu, var)
          y = Relu (n)
        }
        """,
        bn(8),
    )
    out = run_passes(model, "fold_batchnorm")
    assert op_types(out) == ["Conv", "Relu"]
    assert_equivalent(model, out)
    assert_valid(out)


def test_depthwise_conv():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,6,8,8] x) => (float[N,6,8,8] y) <float[6,1,3,3] w, float[6] s, float[6] b, float[6] mu, float[6] var> {
          c = Conv <pads=[1,1,1,1], group=6> (x, w)
          y = BatchNormalization (c, s, b, mu, var)
        }
        """,
        bn(6),
    )
    out = fold(model).model
    assert op_types(out) == ["Conv"]
    assert_equivalent(model, out)
    assert_valid(out)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_with_groups(group):
    # Weight layout [Cin, Cout/group, k, k]: Cin=4, Cout=3*group.
    cout = 3 * group
    model = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4,5,5] x) => (float[N,{cout},10,10] y) <float[4,3,2,2] w, float[{cout}] cb, float[{cout}] s, float[{cout}] b, float[{cout}] mu, float[{cout}] var> {{
          c = ConvTranspose <strides=[2,2], group={group}> (x, w, cb)
          y = BatchNormalization (c, s, b, mu, var)
        }}
        """,
        bn(cout),
    )
    out = fold(model).model
    assert op_types(out) == ["ConvTranspose"]
    assert_equivalent(model, out)
    assert_valid(out)


@pytest.mark.parametrize(
    ("trans_b", "bias", "attrs"),
    [
        (0, False, ""),
        (1, True, "<transB=1>"),
        (1, True, "<transB=1, alpha=0.5, beta=2.0>"),
        (0, True, "<beta=0.25>"),
    ],
)
def test_gemm_bn(trans_b, bias, attrs):
    wshape = "5,7" if trans_b else "7,5"
    model = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,7] x) => (float[N,5] y) <float[{wshape}] w, float[5] gb, float[5] s, float[5] b, float[5] mu, float[5] var> {{
          h = Gemm {attrs} (x, w{", gb" if bias else ""})
          y = BatchNormalization (h, s, b, mu, var)
        }}
        """,
        bn(5),
    )
    out = fold(model).model
    assert op_types(out) == ["Gemm"]
    assert_equivalent(model, out)
    assert_valid(out)


def test_shared_weight_is_not_changed_for_the_other_reader():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,4,8,8] z) <float[4,3,1,1] w, float[4] s, float[4] b, float[4] mu, float[4] var> {
          c = Conv (x, w)
          y = BatchNormalization (c, s, b, mu, var)
          z = Conv (x, w)
        }
        """,
        bn(4),
    )
    out = fold(model).model
    assert op_types(out) == ["Conv", "Conv"]
    assert_equivalent(model, out)


def test_selector_picks_the_layer():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[4,3,1,1] w1, float[4,4,1,1] w2, float[4] s, float[4] b, float[4] mu, float[4] var, float[4] s2, float[4] b2, float[4] mu2, float[4] var2> {
      c1 = Conv (x, w1)
      n1 = BatchNormalization (c1, s, b, mu, var)
      c2 = Conv (n1, w2)
      y = BatchNormalization (c2, s2, b2, mu2, var2)
    }
    """
    model = make_model(text, {**bn(4), **{k + "2": v for k, v in bn(4, seed=3).items()}})
    names = [n.name for n in model.nodes if n.op == "Conv"]
    out = fold(model, layers=names[1]).model
    assert op_types(out) == ["Conv", "BatchNormalization", "Conv"]
    assert_equivalent(model, out)
    out = run_passes(model, f"fold_batchnorm(layers={names[0]})")
    assert op_types(out) == ["Conv", "Conv", "BatchNormalization"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # the Conv output is read twice
        (
            "c = Conv (x, w)\n y = BatchNormalization (c, s, b, mu, var)\n z = Relu (c)",
            "2 consumers",
        ),
        # training mode
        (
            "c = Conv (x, w)\n y = BatchNormalization <training_mode=1> (c, s, b, mu, var)\n z = Relu (c)",
            "consumers",
        ),
        (
            "c = Conv (x, w)\n y = BatchNormalization <training_mode=1> (c, s, b, mu, var)\n z = Relu (y)",
            "training_mode",
        ),
        # parameters computed at run time
        (
            "c = Conv (x, w)\n s2 = Relu (s)\n y = BatchNormalization (c, s2, b, mu, var)\n z = Relu (y)",
            "not constants",
        ),
        # the conv output is itself a graph output
        ("z = Conv (x, w)\n y = BatchNormalization (z, s, b, mu, var)", "graph output"),
    ],
)
def test_must_not_apply(body, reason):
    model = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,4,8,8] z) <float[4,3,1,1] w, float[4] s, float[4] b, float[4] mu, float[4] var> {{
          {body}
        }}
        """,
        bn(4),
    )
    result = fold(model)
    assert not result.modified
    assert op_types(result.model) == op_types(model)
    conv = next(n.name for n in model.nodes if n.op == "Conv")
    assert reason in result.layer_notes[conv]["skipped"]["fold_batchnorm"]


def test_non_constant_scale_input():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,8,8] x, float[4] s) => (float[N,4,8,8] y) <float[4,3,1,1] w, float[4] b, float[4] mu, float[4] var> {
          c = Conv (x, w)
          y = BatchNormalization (c, s, b, mu, var)
        }
        """,
        {k: v for k, v in bn(4).items() if k != "s"},
    )
    assert not fold(model).modified
