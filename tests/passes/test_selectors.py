"""Tests for layer selectors: name globs, op:TYPE, #i-j layer ranges, ! exclusions, errors."""

from __future__ import annotations

import pytest

from tailor.errors import ParameterError
from tailor.passes import Selector
from tailor.passes.fold_batchnorm import FoldBatchNorm
from tests.helpers import make_model

# Layers (weighted nodes) in topological order: conv1 #0, conv2 #1, conv_dw #2, fc #3,
# proj #4. relu1, flat and attn (a MatMul of two activations) are not layers.
TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,8,8] x, float[10,5] v) => (float[N,5] y)
  <float[4,3,3,3] w1, float[6,4,1,1] w2, float[6,1,3,3] wd, float[10,384] wg, float[10,10] wk> {
  [conv1] c1 = Conv <pads=[1,1,1,1]> (x, w1)
  [relu1] r1 = Relu (c1)
  [conv2] c2 = Conv (r1, w2)
  [conv_dw] d = Conv <pads=[1,1,1,1], group=6> (c2, wd)
  [flat] f = Flatten (d)
  [fc] h = Gemm <transB=1> (f, wg)
  [proj] k = MatMul (h, wk)
  [attn] y = MatMul (k, v)
}
"""

ALL = ["conv1", "relu1", "conv2", "conv_dw", "flat", "fc", "proj", "attn"]


@pytest.fixture(scope="module")
def model():
    m = make_model(TEXT)
    assert [n.name for n in m.nodes] == ALL
    return m


def selected(model, text: str) -> list[str]:
    sel = Selector.parse(text)
    return [n.name for n in model.nodes if sel.matches(model, n)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*", ALL),
        ("conv*", ["conv1", "conv2", "conv_dw"]),
        ("conv?", ["conv1", "conv2"]),
        ("conv[2-9]", ["conv2"]),
        ("fc", ["fc"]),
        ("FC", []),  # names are case-sensitive
        ("nomatch*", []),
        ("op:Conv", ["conv1", "conv2", "conv_dw"]),
        ("op:conv", ["conv1", "conv2", "conv_dw"]),  # op types are not
        ("OP:MatMul", ["proj", "attn"]),
        ("op:*mul", ["proj", "attn"]),
        ("op:Relu|op:Flatten", ["relu1", "flat"]),
        ("#0", ["conv1"]),
        ("#1-3", ["conv2", "conv_dw", "fc"]),
        ("#3-", ["fc", "proj"]),
        ("#4-4", ["proj"]),
        ("#7", []),
        ("#0|#4", ["conv1", "proj"]),
        ("!conv*", ["relu1", "flat", "fc", "proj", "attn"]),
        ("!op:Conv|!op:MatMul", ["relu1", "flat", "fc"]),
        ("!#1-3", ["conv1", "relu1", "flat", "proj", "attn"]),  # non-layers are in no range
        ("op:Conv|!conv_dw", ["conv1", "conv2"]),
        ("conv*|fc|!#0", ["conv2", "conv_dw", "fc"]),
        ("#0-|!op:Gemm", ["conv1", "conv2", "conv_dw", "proj"]),
        ("op:MatMul|!#0-", ["attn"]),
        (" conv1 | fc ", ["conv1", "fc"]),
        ("! conv1|conv*", ["conv2", "conv_dw"]),
        ("*|!*", []),
    ],
)
def test_selection(model, text, expected):
    assert selected(model, text) == expected


def test_selects_all():
    assert Selector.parse("*").selects_all
    assert Selector.parse("*|*").selects_all
    for text in ("conv*", "*|!fc", "op:*", "#0-"):
        assert not Selector.parse(text).selects_all


def test_parse_is_cached_and_keeps_the_text():
    sel = Selector.parse("conv*|!#2")
    assert sel is Selector.parse("conv*|!#2")
    assert sel.text == "conv*|!#2"
    assert [(t.kind, t.negate) for t in sel.terms] == [("name", False), ("range", True)]


def test_ranges_follow_the_model_after_a_rewrite(model):
    """Indices are positions among the current model's layers, recomputed on each call."""
    m = model.copy()
    m.remove_nodes([m.node("conv1")])  # graph left broken: only the index view matters
    assert selected(m, "#0") == ["conv2"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "has an empty term"),
        ("conv1|", "has an empty term"),
        ("a||b", "has an empty term"),
        ("!", "has an empty term"),
        ("  ", "has an empty term"),
        ("#", "is not #i, #i-j or #i-"),
        ("#a", "is not #i, #i-j or #i-"),
        ("#-3", "is not #i, #i-j or #i-"),
        ("#1-2-3", "is not #i, #i-j or #i-"),
        ("#1.5", "is not #i, #i-j or #i-"),
        ("#3-1", "range '#3-1' is empty (end before start)"),
        ("op:", "names no op type"),
        ("!op: ", "names no op type"),
    ],
)
def test_bad_selector(text, fragment):
    with pytest.raises(ParameterError, match="layer selector") as info:
        Selector.parse(text)
    assert fragment in str(info.value)


def test_bad_selector_in_a_pass_names_pass_and_parameter():
    with pytest.raises(ParameterError) as info:
        FoldBatchNorm(layers="conv*|#2-1")
    assert str(info.value).startswith("pass fold_batchnorm: parameter layers='conv*|#2-1': ")


def test_pass_selects_through_its_layers_parameter(model):
    p = FoldBatchNorm(layers="op:Conv|!#1")
    assert [n.name for n in model.nodes if p.selects(model, n)] == ["conv1", "conv_dw"]
    default = FoldBatchNorm()
    assert all(default.selects(model, n) for n in model.nodes)


def test_unnamed_nodes_get_names_selectors_can_use():
    m = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4] x) => (float[N,4] y) {
          a = Relu (x)
          y = Relu (a)
        }
        """
    )
    assert selected(m, "Relu_*") == ["Relu_0", "Relu_1"]
    assert selected(m, "Relu_1") == ["Relu_1"]
