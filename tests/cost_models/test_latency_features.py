"""Tests for the learned latency model's kernel features that decide onnxruntime's code
path: channel alignment to the NCHWc block, the padding waste of unaligned channels, and
the per-group, per-pixel work of grouped (not depthwise) convolutions."""

from __future__ import annotations

import pytest

from tailor.cost_models.latency import FEATURE_NAMES, features, kernels
from tests.helpers import make_model

HEADER = '<ir_version: 8, opset_import: ["" : 13]>'


def _conv(cin: int, cout: int, group: int, size: int = 10) -> dict[str, float]:
    text = f"""
    {HEADER}
    g (float[1,{cin},{size},{size}] x) => (float[1,{cout},{size},{size}] y)
      <float[{cout},{cin // group},3,3] w> {{
      y = Conv <pads=[1,1,1,1], group={group}> (x, w)
    }}
    """
    [k] = kernels(make_model(text))
    return dict(zip(FEATURE_NAMES, features(k), strict=True))


def test_grouped_conv_features():
    f = _conv(12, 12, 4)
    assert f["grouped"] == 1 and f["depthwise"] == 0
    assert f["cin_per_group"] == 3 and f["cout_per_group"] == 3
    assert f["out_pixels"] == 100 and f["group_pixels"] == 400
    # 12 channels take two blocks of 8: 16/12 of the work.
    assert f["cin_pad8"] == pytest.approx(16 / 12) and f["cout_pad8"] == pytest.approx(16 / 12)
    assert (f["cin_mod4"], f["cin_mod8"], f["cin_mod16"]) == (1, 0, 0)


def test_depthwise_is_not_grouped_but_a_channel_multiplier_is():
    depthwise = _conv(8, 8, 8)
    assert depthwise["depthwise"] == 1 and depthwise["grouped"] == 0
    assert depthwise["group_pixels"] == 800 and depthwise["cin_pad8"] == 1
    multiplier = _conv(8, 16, 8)
    assert multiplier["grouped"] == 1 and multiplier["cout_per_group"] == 2
    assert (multiplier["cout_mod8"], multiplier["cout_mod16"]) == (1, 1)


def test_plain_conv_is_not_grouped():
    f = _conv(5, 16, 1, size=6)
    assert f["grouped"] == 0 and f["group_pixels"] == 36 and f["out_pixels"] == 36
    assert f["cin_pad8"] == pytest.approx(8 / 5) and f["cout_pad8"] == 1
    assert f["cin_mod4"] == 0 and f["cout_mod4"] == 1
