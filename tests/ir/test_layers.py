"""Tests for the layer view: shapes, params, MACs and bytes of Conv, ConvTranspose, Gemm and
MatMul, checked against hand-written formulas; model totals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tailor.ir.layers import is_layer_node, layer_weight, layers, summarize
from tests.helpers import make_model

HEADER = '<ir_version: 8, opset_import: ["" : 13]>'


def conv_out(size: int, k: int, stride: int, dilation: int, pad_begin: int, pad_end: int) -> int:
    """Output length of a convolution (ONNX Conv, floor mode)."""
    return (size + pad_begin + pad_end - dilation * (k - 1) - 1) // stride + 1


def only_layer(text: str, weights=None):
    model = make_model(text, weights)
    found = layers(model)
    assert len(found) == 1
    return found[0]


# ---------------------------------------------------------------- Conv
@pytest.mark.parametrize(
    ("cin", "cout", "group", "spatial", "kernel", "strides", "dilations", "pads", "bias"),
    [
        (3, 4, 1, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), True),  # plain
        (8, 16, 2, (16, 16), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), False),  # grouped, strided
        (6, 6, 6, (10, 10), (3, 3), (1, 1), (1, 1), (0, 0, 0, 0), True),  # depthwise
        (6, 12, 6, (10, 10), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), False),  # depthwise x2
        (3, 5, 1, (16, 16), (3, 3), (1, 1), (2, 2), (0, 0, 0, 0), False),  # dilated
        (2, 3, 1, (15, 11), (3, 2), (2, 3), (2, 1), (1, 0, 2, 1), True),  # all at once, asymmetric
        (4, 8, 4, (12, 9), (1, 1), (3, 2), (1, 1), (0, 0, 0, 0), True),  # grouped pointwise
    ],
)
def test_conv(cin, cout, group, spatial, kernel, strides, dilations, pads, bias):
    h, w = spatial
    kh, kw = kernel
    oh = conv_out(h, kh, strides[0], dilations[0], pads[0], pads[2])
    ow = conv_out(w, kw, strides[1], dilations[1], pads[1], pads[3])
    text = f"""
    {HEADER}
    g (float[N,{cin},{h},{w}] x) => (float[N,{cout},{oh},{ow}] y)
      <float[{cout},{cin // group},{kh},{kw}] wt{", float[" + str(cout) + "] b" if bias else ""}> {{
      [conv] y = Conv <group={group}, strides={list(strides)}, dilations={list(dilations)}, pads={list(pads)}>
        (x, wt{", b" if bias else ""})
    }}
    """
    layer = only_layer(text)
    weight_params = cout * (cin // group) * kh * kw
    assert (layer.index, layer.name, layer.op) == (0, "conv", "Conv")
    assert (layer.in_channels, layer.out_channels, layer.groups) == (cin, cout, group)
    assert layer.kernel == (kh, kw)
    assert layer.input_shape == (1, cin, h, w)
    assert layer.output_shape == (1, cout, oh, ow)
    # every output element sums over (cin / group) * kh * kw products
    assert layer.macs == cout * oh * ow * (cin // group) * kh * kw
    assert layer.params == weight_params + (cout if bias else 0)
    assert layer.weight_bytes == 4 * layer.params
    assert layer.is_depthwise == (group > 1 and group == cin)
    assert layer.weight.shape == (cout, cin // group, kh, kw)
    assert (layer.bias is not None) == bias


def test_conv_numbers_by_hand():
    """One case worked out on paper: 3x3, stride 2, pad 1 on 16x16, 8 -> 16 channels, 2 groups."""
    layer = only_layer(f"""
    {HEADER}
    g (float[N,8,16,16] x) => (float[N,16,8,8] y) <float[16,4,3,3] wt, float[16] b> {{
      y = Conv <group=2, strides=[2,2], pads=[1,1,1,1]> (x, wt, b)
    }}
    """)
    assert layer.output_shape == (1, 16, 8, 8)
    assert layer.macs == 16 * 8 * 8 * 4 * 3 * 3 == 36864
    assert layer.params == 16 * 4 * 9 + 16 == 592
    assert layer.weight_bytes == 2368


def test_conv1d_and_float16():
    layer = only_layer(f"""
    {HEADER}
    g (float16[N,4,20] x) => (float16[N,8,16] y) <float16[8,4,5] wt> {{
      y = Conv (x, wt)
    }}
    """)
    assert layer.kernel == (5,)
    assert layer.macs == 8 * 16 * 4 * 5
    assert layer.params == 160
    assert layer.weight_bytes == 2 * 160


def test_dynamic_spatial_dims_give_no_macs():
    model = make_model(f"""
    {HEADER}
    g (float[N,3,H,W] x) => (float[N,2] y) <float[4,3,3,3] w1, float[2,4] wf> {{
      c = Conv (x, w1)
      p = GlobalAveragePool (c)
      f = Flatten (p)
      y = Gemm <transB=1> (f, wf)
    }}
    """)
    conv, fc = layers(model)
    assert conv.macs is None and conv.output_shape is None and conv.input_shape is None
    assert conv.params == 108  # parameters never depend on shapes
    assert fc.macs == 8
    assert summarize(model).macs is None


# ---------------------------------------------------------------- ConvTranspose
@pytest.mark.parametrize(("group", "bias"), [(1, False), (2, True), (4, False)])
def test_conv_transpose(group, bias):
    # weight [Cin, Cout/group, k, k]
    cin, per_group, k, h = 4, 3, 2, 5
    cout = per_group * group
    layer = only_layer(f"""
    {HEADER}
    g (float[N,{cin},{h},{h}] x) => (float[N,{cout},10,10] y)
      <float[{cin},{per_group},{k},{k}] wt{", float[" + str(cout) + "] b" if bias else ""}> {{
      y = ConvTranspose <strides=[2,2], group={group}> (x, wt{", b" if bias else ""})
    }}
    """)
    assert (layer.in_channels, layer.out_channels, layer.groups) == (cin, cout, group)
    assert layer.output_shape == (1, cout, 10, 10)
    # every input element is scattered into (cout / group) * k * k outputs
    assert layer.macs == cin * h * h * per_group * k * k
    assert layer.params == cin * per_group * k * k + (cout if bias else 0)
    assert not layer.is_depthwise


# ---------------------------------------------------------------- Gemm
@pytest.mark.parametrize(
    ("attrs", "a_shape", "b_shape", "rows", "k", "n"),
    [
        ("", "N,7", "7,5", 1, 7, 5),
        ("<transB=1>", "N,7", "5,7", 1, 7, 5),
        ("<transB=1, alpha=0.5>", "3,7", "5,7", 3, 7, 5),
        ("<transA=1>", "7,3", "7,5", 3, 7, 5),
        ("<transA=1, transB=1>", "7,3", "5,7", 3, 7, 5),
    ],
)
def test_gemm(attrs, a_shape, b_shape, rows, k, n):
    out_rows = "N" if a_shape.startswith("N") else rows
    layer = only_layer(f"""
    {HEADER}
    g (float[{a_shape}] x) => (float[{out_rows},{n}] y) <float[{b_shape}] wt, float[{n}] b> {{
      y = Gemm {attrs} (x, wt, b)
    }}
    """)
    assert (layer.in_channels, layer.out_channels) == (k, n)
    assert layer.macs == rows * k * n
    assert layer.params == k * n + n
    assert layer.weight_bytes == 4 * (k * n + n)
    assert layer.kernel == () and layer.groups == 1


def test_gemm_with_constant_a_is_not_a_layer():
    """Only input B is a weight: Gemm(W, x) with a constant A is not counted."""
    model = make_model(f"""
    {HEADER}
    g (float[7,3] x) => (float[5,3] y) <float[5,7] wt> {{
      y = Gemm (wt, x)
    }}
    """)
    assert layers(model) == []


# ---------------------------------------------------------------- MatMul
def test_matmul_weight_second():
    layer = only_layer(f"""
    {HEADER}
    g (float[N,3,7] x) => (float[N,3,5] y) <float[7,5] wt> {{
      y = MatMul (x, wt)
    }}
    """)
    assert (layer.in_channels, layer.out_channels) == (7, 5)
    assert layer.input_shape == (1, 3, 7) and layer.output_shape == (1, 3, 5)
    assert layer.macs == 3 * 5 * 7
    assert layer.params == 35 and layer.bias is None


def test_matmul_weight_first():
    model = make_model(f"""
    {HEADER}
    g (float[N,7,3] x) => (float[N,5,3] y) <float[5,7] wt> {{
      y = MatMul (wt, x)
    }}
    """)
    (layer,) = layers(model)
    assert layer_weight(model, layer.node)[0] == 0
    assert (layer.in_channels, layer.out_channels) == (7, 5)
    assert layer.input_shape == (1, 7, 3)
    assert layer.macs == 5 * 3 * 7


def test_batched_weight_matmul():
    layer = only_layer(f"""
    {HEADER}
    g (float[2,4,6] x) => (float[2,4,3] y) <float[2,6,3] wt> {{
      y = MatMul (x, wt)
    }}
    """)
    assert (layer.in_channels, layer.out_channels) == (6, 3)
    assert layer.macs == 2 * 4 * 3 * 6
    assert layer.params == 36


@pytest.mark.parametrize(
    ("decl", "body"),
    [
        ("float[N,7] x, float[7,5] v", "y = MatMul (x, v)"),  # two activations
        ("float[N,7] x", "y = MatMul (x, v)"),  # a 1-D constant is not a weight matrix
    ],
)
def test_matmul_that_is_not_a_layer(decl, body):
    weights = {} if "v" in decl else {"v": np.ones(7, np.float32)}
    out = "float[N,5] y" if "v" in decl else "float[N] y"
    model = make_model(f"{HEADER}\ng ({decl}) => ({out}) {{\n {body}\n}}", weights)
    assert layers(model) == []
    assert not is_layer_node(model, model.nodes[0])


def test_integer_weight_is_not_a_layer():
    model = make_model(
        f"""
        {HEADER}
        g (int32[N,7] x) => (int32[N,5] y) <int32[7,5] wt> {{
          y = MatMul (x, wt)
        }}
        """
    )
    assert layers(model) == []


# ---------------------------------------------------------------- summarize
SUMMARY = f"""
{HEADER}
g (float[N,3,8,8] x) => (float[N,10] y, float[N,4,8,8] z)
  <float[4,3,3,3] w1, float[4] b1, float[4] s, float[4] bb, float[4] mu, float[4] var,
   int64[2] shape, float[256,10] wf> {{
  [conv_a] c = Conv <pads=[1,1,1,1]> (x, w1, b1)
  [bn] n = BatchNormalization (c, s, bb, mu, var)
  [relu] r = Relu (n)
  [conv_b] z = Conv <pads=[1,1,1,1]> (x, w1, b1)
  [reshape] f = Reshape (r, shape)
  [fc] y = MatMul (f, wf)
}}
"""


def test_summarize_totals():
    shape = np.array([-1, 256], np.int64)
    model = make_model(SUMMARY, {"shape": shape, "var": np.ones(4, np.float32)})
    summary = summarize(model)
    assert [(la.index, la.name) for la in summary.layers] == [
        (0, "conv_a"),
        (1, "conv_b"),
        (2, "fc"),
    ]
    conv_macs = 4 * 8 * 8 * 3 * 9
    assert [la.macs for la in summary.layers] == [conv_macs, conv_macs, 256 * 10]
    assert summary.macs == 2 * conv_macs + 2560
    # every initializer once: the shared conv weight and bias are stored once
    sizes = [108, 4, 4, 4, 4, 4, 2, 2560]
    assert summary.params == sum(sizes)
    assert summary.weight_bytes == 4 * sum(sizes[:-2]) + 8 * 2 + 4 * 2560
    assert summary.nodes == 6
    assert summary.ops == {"BatchNormalization": 1, "Conv": 2, "MatMul": 1, "Relu": 1, "Reshape": 1}
    # per layer, the shared weight counts for each reader
    assert [la.params for la in summary.layers] == [112, 112, 2560]
    data = summary.as_dict()
    assert data["macs"] == summary.macs and data["params"] == summary.params
    assert data["layers"][2] == {
        "index": 2,
        "name": "fc",
        "op": "MatMul",
        "input_shape": [1, 256],
        "output_shape": [1, 10],
        "in_channels": 256,
        "out_channels": 10,
        "kernel": [],
        "groups": 1,
        "params": 2560,
        "macs": 2560,
        "weight_bytes": 10240,
    }


def test_summarize_model_without_layers():
    model = make_model(f"{HEADER}\ng (float[N,4] x) => (float[N,4] y) {{\n y = Relu (x)\n}}")
    summary = summarize(model)
    assert summary.layers == [] and summary.macs == 0 and summary.params == 0
    assert summary.ops == {"Relu": 1}


def test_layer_totals_match_a_formula_over_a_stack():
    """A VGG-like stack: the sum of per-layer figures equals the model total."""
    chans = [3, 8, 16, 16]
    decls, body, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(chans, chans[1:], strict=False)):
        decls.append(f"float[{b},{a},3,3] w{i}")
        body.append(f"c{i} = Conv <pads=[1,1,1,1]> ({prev}, w{i})")
        body.append(f"r{i} = Relu (c{i})")
        prev = f"r{i}"
    body[-1] = body[-1].replace(f"r{len(chans) - 2} =", "y =")
    model = make_model(
        f"{HEADER}\ng (float[N,3,12,12] x) => (float[N,16,12,12] y) <{', '.join(decls)}> {{\n"
        + "\n".join(body)
        + "\n}"
    )
    summary = summarize(model)
    expected = sum(b * 144 * a * 9 for a, b in zip(chans, chans[1:], strict=False))
    assert summary.macs == expected == sum(la.macs for la in summary.layers)
    assert summary.params == sum(a * b * 9 for a, b in zip(chans, chans[1:], strict=False))
    assert math.prod(summary.layers[-1].output_shape) == 16 * 144
