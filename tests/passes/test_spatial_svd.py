"""Tests for spatial_svd (kh x kw Conv into kh x 1 then 1 x kw).

Full rank min(Cin*kh, Cout*kw) (rank=1.0, force=true) must be exact to 1e-5 relative for
any strides, pads, dilations and auto_pad; below it the error is reported per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tailor.ir import Model, run_model
from tailor.passes import PassContext, PassManager
from tailor.passes.spatial_svd import SpatialSVD
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types


def spatial(model: Model, data=None, **config):
    return SpatialSVD(**config).run(model.copy(), PassContext(calibration=data))


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def conv_model(attrs: str, wshape: str, xshape: str, yshape: str, bias: bool = True) -> Model:
    cout = wshape.split(",")[0]
    return make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[{xshape}] x) => (float[{yshape}] y) <float[{wshape}] w{f", float[{cout}] b" if bias else ""}> {{
          y = Conv {f"<{attrs}>" if attrs else ""} (x, w{", b" if bias else ""})
        }}
        """
    )


# ---------------------------------------------------------------------- structure and exactness
def test_split_per_axis_and_exact_at_full_rank():
    model = conv_model(
        "pads=[1,2,2,0], strides=[2,3], dilations=[2,1]", "8,5,3,4", "N,5,11,12", "N,8,5,4"
    )
    result = spatial(model, rank=1.0, force=True)
    out = result.model
    assert op_types(out) == ["Conv", "Conv"]
    vertical, horizontal = out.nodes
    assert out.constant_value(vertical.inputs[1]).shape == (15, 5, 3, 1)  # R = min(5*3, 8*4)
    assert out.constant_value(horizontal.inputs[1]).shape == (8, 15, 1, 4)
    assert vertical.attrs == {
        "kernel_shape": [3, 1],
        "strides": [2, 1],
        "dilations": [2, 1],
        "pads": [1, 0, 2, 0],
    }
    assert horizontal.attrs == {
        "kernel_shape": [1, 4],
        "strides": [1, 3],
        "dilations": [1, 1],
        "pads": [0, 2, 0, 0],
    }
    assert len(horizontal.inputs) == 3 and len(vertical.inputs) == 2  # the bias goes last
    assert [t.name for t in out.outputs] == ["y"]
    assert result.layer_notes["Conv_0"]["rank"] == result.layer_notes["Conv_0"]["full_rank"] == 15
    # lossless at full rank: 1e-5 relative
    assert_equivalent(model, out)
    assert_valid(out)


@pytest.mark.parametrize(
    ("attrs", "yshape"),
    [
        ('auto_pad="SAME_UPPER", strides=[2,2]', "N,8,5,4"),
        ('auto_pad="SAME_LOWER", strides=[2,3]', "N,8,5,3"),
        ('auto_pad="VALID", dilations=[2,1]', "N,8,5,4"),
        ("", "N,8,7,4"),
    ],
)
def test_auto_pad_splits_per_axis(attrs, yshape):
    model = conv_model(attrs, "8,6,3,5", "N,6,9,8", yshape, bias=False)
    out = spatial(model, rank=1.0, force=True).model
    assert op_types(out) == ["Conv", "Conv"]
    assert_equivalent(model, out)
    assert_valid(out)


def test_truncated_rank_reports_the_dropped_singular_values():
    model = conv_model("pads=[1,1,1,1]", "32,16,3,3", "N,16,8,8", "N,32,8,8")
    w = model.constant_value(model.nodes[0].inputs[1]).astype(np.float64)
    s = np.linalg.svd(w.transpose(1, 2, 0, 3).reshape(48, 96), compute_uv=False)
    result = spatial(model, rank=0.25)
    note = result.layer_notes["Conv_0"]
    assert note["rank"] == 12
    assert note["params_before"] == 32 * 16 * 9 + 32
    assert note["params_after"] == 12 * (16 * 3 + 32 * 3) + 32
    expected = np.sqrt(np.sum(s[12:] ** 2) / np.sum(s**2))
    assert note["weight_rel_error"] == pytest.approx(expected, rel=1e-6)
    assert_valid(result.model)


def test_with_data_reports_output_error_and_corrects_the_bias():
    model = conv_model("pads=[1,1,1,1]", "32,16,3,3", "N,16,8,8", "N,32,8,8")
    x = {"x": np.abs(randn(16, 16, 8, 8, seed=2))}
    raw = spatial(model, x, rank=6, bias_correction=False).layer_notes["Conv_0"]
    result = spatial(model, x, rank=6)
    note = result.layer_notes["Conv_0"]
    assert note["bias_corrected"] is True
    assert 0.0 < note["output_rel_error"] <= raw["output_rel_error"]
    assert_valid(result.model)


# ---------------------------------------------------------------------- must not apply
@pytest.mark.parametrize(
    ("attrs", "wshape", "xshape", "yshape", "reason"),
    [
        ("pads=[1,0,1,0]", "8,6,3,1", "N,6,5,5", "N,8,5,5", "not separable"),
        ("", "8,6,1,1", "N,6,5,5", "N,8,5,5", "not separable"),
        ("pads=[1,1,1,1], group=2", "8,3,3,3", "N,6,5,5", "N,8,5,5", "grouped"),
        ("pads=[1,1]", "8,6,3", "N,6,5", "N,8,5", "not a 2-D"),
        ("pads=[1,1,1,1]", "8,6,3,3", "N,6,5,5", "N,8,5,5", "not below 0.9x"),
    ],
)
def test_must_not_apply(attrs, wshape, xshape, yshape, reason):
    model = conv_model(attrs, wshape, xshape, yshape)
    result = spatial(model, rank=1.0)
    assert not result.modified
    assert op_types(result.model) == ["Conv"]
    assert reason in result.layer_notes["Conv_0"]["skipped"]


# ---------------------------------------------------------------------- architectures
@pytest.mark.parametrize("with_data", [False, True])
def test_resnet18(with_data: bool, arch_path: Callable[[str], Path]):
    model = Model.load(arch_path("resnet18"))
    images = randn(24, 3, 32, 32, seed=11)
    data = {"input": images[:16]} if with_data else None
    result = PassManager.from_text("fuse,spatial_svd(rank=0.25)").run(
        model, PassContext(calibration=data)
    )
    record = result.records[-1]
    done = {n: note for n, note in record.layer_notes.items() if "skipped" not in note}
    assert len(done) == 7  # the stem and the six 3x3 convs of the blocks
    for note in done.values():
        assert note["params_after"] < note["params_before"]
        assert ("output_rel_error" in note) == with_data
    out = result.model
    assert_valid(out)
    x = {"input": images[16:]}
    assert run_model(out, x)["logits"].shape == run_model(model, x)["logits"].shape == (8, 10)
    assert [t.name for t in out.outputs] == ["logits"]
