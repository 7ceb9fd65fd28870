"""Tests for fold_pad: a zero Pad into the pads of Conv and AveragePool, across opsets."""

from __future__ import annotations

import numpy as np
import pytest

from tailor.passes import PassContext
from tailor.passes.fold_pad import FoldPad
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types, run_passes


def fold(model, **config):
    return FoldPad(**config).run(model.copy(), PassContext())


def conv_model(
    opset: int,
    pad_line: str,
    *,
    conv_attrs: str = "<pads=[1,0,0,1]>",
    extra_inits: str = "",
    out="float[N,4,?,?] y",
    weights=None,
):
    return make_model(
        f"""
        <ir_version: 9, opset_import: ["" : {opset}]>
        g (float[N,3,8,8] x) => ({out}) <float[4,3,3,3] w{extra_inits}> {{
          {pad_line}
          y = Conv {conv_attrs} (p, w)
        }}
        """,
        weights,
    )


PADS = np.array([0, 0, 2, 1, 0, 0, 1, 3], np.int64)


@pytest.mark.parametrize(
    ("opset", "pad_line", "extra", "weights"),
    [
        (10, "p = Pad <pads=[0,0,2,1,0,0,1,3]> (x)", "", None),
        (10, 'p = Pad <pads=[0,0,2,1,0,0,1,3], mode="constant", value=0.0> (x)', "", None),
        (13, "p = Pad (x, pads)", ", int64[8] pads", {"pads": PADS}),
        (
            13,
            "p = Pad (x, pads, zero)",
            ", int64[8] pads, float zero",
            {"pads": PADS, "zero": np.float32(0)},
        ),
        (
            13,
            "pads = Constant <value=int64[8] {0,0,2,1,0,0,1,3}> ()\n zero = Constant <value=float {0.0}> ()\n p = Pad (x, pads, zero)",
            "",
            None,
        ),
        (
            18,
            "p = Pad (x, pads, , axes)",
            ", int64[4] pads, int64[2] axes",
            {"pads": np.array([2, 1, 1, 3]), "axes": np.array([2, 3])},
        ),
        (
            18,
            "p = Pad (x, pads, , axes)",
            ", int64[4] pads, int64[2] axes",
            {"pads": np.array([1, 2, 3, 1]), "axes": np.array([-1, -2])},
        ),
        (19, "p = Pad (x, pads)", ", int64[8] pads", {"pads": PADS}),
    ],
)
def test_pad_folds_into_conv(opset, pad_line, extra, weights):
    model = conv_model(opset, pad_line, extra_inits=extra, weights=weights)
    result = fold(model)
    out = result.model
    assert op_types(out) == ["Conv"], result.layer_notes
    assert out.nodes[0].inputs[0].name == "x"
    assert list(out.nodes[0].attrs["pads"]) == [1 + 2, 0 + 1, 0 + 1, 1 + 3]
    assert [t.name for t in out.outputs] == ["y"]
    assert_equivalent(model, out)
    assert_valid(out)


def test_conv1d_and_conv_without_pads_via_pass_manager():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,16] x) => (float[N,4,?] y) <float[4,3,3] w, int64[6] pads> {
          p = Pad (x, pads)
          y = Conv <dilations=[2], strides=[2]> (p, w)
        }
        """,
        {"pads": np.array([0, 0, 2, 0, 0, 1], np.int64)},
    )
    out = run_passes(model, "fold_pad")
    assert op_types(out) == ["Conv"]
    assert list(out.nodes[0].attrs["pads"]) == [2, 1]
    assert_equivalent(model, out)
    assert_valid(out)


@pytest.mark.parametrize("ceil_mode", [0, 1])
def test_pad_folds_into_average_pool_counting_pads(ceil_mode):
    model = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,8,8] x) => (float[N,3,?,?] y) <int64[8] pads> {{
          p = Pad (x, pads)
          y = AveragePool <kernel_shape=[3,3], strides=[2,2], count_include_pad=1, ceil_mode={ceil_mode}> (p)
        }}
        """,
        {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 2], np.int64)},
    )
    out = fold(model).model
    assert op_types(out) == ["AveragePool"]
    assert_equivalent(model, out)
    assert_valid(out)


@pytest.mark.parametrize(
    ("pad_line", "weights", "conv_attrs", "reason"),
    [
        ('p = Pad <mode="reflect"> (x, pads)', {"pads": PADS}, "", "reflect"),
        ("p = Pad (x, pads, v)", {"pads": PADS, "v": np.float32(1.5)}, "", "pads with 1.5"),
        ("p = Pad (x, pads)", {"pads": np.array([0, 0, 1, 1, 0, 0, -1, 1])}, "", "negative"),
        ("p = Pad (x, pads)", {"pads": np.array([0, 1, 1, 1, 0, 0, 1, 1])}, "", "channel"),
        ("p = Pad (x, pads)", {"pads": PADS}, '<auto_pad="SAME_UPPER">', "auto_pad"),
        ("p = Pad (x, pads)\n z = Relu (p)", {"pads": PADS}, "", "2 consumers"),
    ],
)
def test_must_not_apply(pad_line, weights, conv_attrs, reason):
    extra = "".join(
        f", {'float' if v.dtype == np.float32 else 'int64'}[{','.join(map(str, np.shape(v)))}] {k}"
        for k, v in weights.items()
    )
    outs = "float[N,4,?,?] y" + (", float[N,3,?,?] z" if "z =" in pad_line else "")
    model = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,8,8] x) => ({outs}) <float[4,3,3,3] w{extra}> {{
          {pad_line}
          y = Conv {conv_attrs} (p, w)
        }}
        """,
        {k: np.asarray(v) for k, v in weights.items()},
    )
    result = fold(model)
    assert not result.modified
    assert op_types(result.model) == op_types(model)
    conv = next(n.name for n in model.nodes if n.op == "Conv")
    assert reason in result.layer_notes[conv]["skipped"]["fold_pad"]


def test_average_pool_excluding_pads_is_left_alone():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,8,8] x) => (float[N,3,?,?] y) <int64[8] pads> {
          p = Pad (x, pads)
          y = AveragePool <kernel_shape=[3,3]> (p)
        }
        """,
        {"pads": PADS},
    )
    result = fold(model)
    assert not result.modified
    assert "count_include_pad=0" in result.layer_notes[model.nodes[1].name]["skipped"]["fold_pad"]
