"""Tests for depthwise_separable (k x k Conv into a depthwise k x k Conv with channel
multiplier r, then a 1x1 Conv), fitted per input channel by SVD.

At r = min(Cout, k*k) (rank=1.0, force=true) the pair must be exact to 1e-5 relative;
below it the error is reported per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tailor.ir import Model, run_model
from tailor.passes import PassContext, PassManager
from tailor.passes.depthwise_separable import DepthwiseSeparable
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types


def separable(model: Model, data=None, **config):
    return DepthwiseSeparable(**config).run(model.copy(), PassContext(calibration=data))


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
@pytest.mark.parametrize(
    ("wshape", "r"),
    [
        ("4,5,3,3", 4),  # Cout < k*k: r = Cout
        ("16,5,3,3", 9),  # Cout > k*k: r = k*k
    ],
)
def test_depthwise_then_pointwise_exact_at_full_multiplier(wshape, r):
    cout = int(wshape.split(",")[0])
    model = conv_model(
        "pads=[1,0,2,1], strides=[2,1], dilations=[1,2]", wshape, "N,5,9,9", f"N,{cout},5,6"
    )
    result = separable(model, rank=1.0, force=True)
    out = result.model
    assert op_types(out) == ["Conv", "Conv"]
    dw, pw = out.nodes
    assert out.constant_value(dw.inputs[1]).shape == (5 * r, 1, 3, 3)
    assert out.constant_value(pw.inputs[1]).shape == (cout, 5 * r, 1, 1)
    assert dw.attrs["group"] == 5  # one group per input channel, r outputs each
    assert dw.attrs["strides"] == [2, 1] and dw.attrs["pads"] == [1, 0, 2, 1]
    assert pw.attrs == {"kernel_shape": [1, 1]}
    assert len(pw.inputs) == 3 and len(dw.inputs) == 2
    assert [t.name for t in out.outputs] == ["y"]
    note = result.layer_notes["Conv_0"]
    assert note["rank"] == note["full_rank"] == r
    # lossless at the full multiplier: 1e-5 relative
    assert_equivalent(model, out)
    assert_valid(out)


@pytest.mark.parametrize(
    ("attrs", "wshape", "xshape", "yshape"),
    [
        ("pads=[2,2], strides=[2]", "12,4,5", "N,4,16", "N,12,8"),  # Conv1d
        ('auto_pad="SAME_LOWER", strides=[2,2]', "12,4,3,3", "N,4,7,7", "N,12,4,4"),
    ],
)
def test_conv1d_and_auto_pad_are_exact(attrs, wshape, xshape, yshape):
    model = conv_model(attrs, wshape, xshape, yshape, bias=False)
    out = separable(model, rank=1.0, force=True).model
    assert op_types(out) == ["Conv", "Conv"]
    assert_equivalent(model, out)
    assert_valid(out)


def test_truncated_multiplier_reports_the_per_channel_error():
    model = conv_model("pads=[1,1,1,1]", "32,8,3,3", "N,8,6,6", "N,32,6,6")
    w = model.constant_value(model.nodes[0].inputs[1]).astype(np.float64)
    result = separable(model, rank=0.34)  # ceil(0.34 * 9) = 4
    note = result.layer_notes["Conv_0"]
    assert note["rank"] == 4
    assert note["params_before"] == 32 * 8 * 9 + 32
    assert note["params_after"] == 8 * 4 * 9 + 32 * 8 * 4 + 32
    dropped = sum(
        np.sum(np.linalg.svd(w[:, c].reshape(32, 9), compute_uv=False)[4:] ** 2) for c in range(8)
    )
    assert note["weight_rel_error"] == pytest.approx(np.sqrt(dropped) / np.linalg.norm(w), rel=1e-6)
    assert_valid(result.model)


def test_with_data_reports_output_error_and_corrects_the_bias():
    model = conv_model("pads=[1,1,1,1]", "32,8,3,3", "N,8,6,6", "N,32,6,6", bias=False)
    x = {"x": np.abs(randn(16, 8, 6, 6, seed=2))}
    raw = separable(model, x, rank=2, bias_correction=False).layer_notes["Conv_0"]
    result = separable(model, x, rank=2)
    note = result.layer_notes["Conv_0"]
    assert note["bias_corrected"] is True
    assert note["params_after"] == 8 * 2 * 9 + 32 * 8 * 2 + 32  # the created bias counts
    assert 0.0 < note["output_rel_error"] <= raw["output_rel_error"]
    assert_valid(result.model)


# ---------------------------------------------------------------------- must not apply
@pytest.mark.parametrize(
    ("attrs", "wshape", "reason"),
    [
        ("", "8,6,1,1", "1x1"),
        ("pads=[1,1,1,1], group=2", "8,3,3,3", "grouped"),
        ("pads=[1,1,1,1]", "8,6,3,3", "not below 0.9x"),  # r = 8 >= 8*9/17
    ],
)
def test_must_not_apply(attrs, wshape, reason):
    model = conv_model(attrs, wshape, "N,6,5,5", "N,8,5,5")
    result = separable(model, rank=1.0)
    assert not result.modified
    assert op_types(result.model) == ["Conv"]
    assert reason in result.layer_notes["Conv_0"]["skipped"]


# ---------------------------------------------------------------------- architectures
@pytest.mark.parametrize("with_data", [False, True])
def test_resnet18(with_data: bool, arch_path: Callable[[str], Path]):
    model = Model.load(arch_path("resnet18"))
    images = randn(24, 3, 32, 32, seed=11)
    data = {"input": images[:16]} if with_data else None
    result = PassManager.from_text("fuse,depthwise_separable(rank=0.25)").run(
        model, PassContext(calibration=data)
    )
    record = result.records[-1]
    done = {n: note for n, note in record.layer_notes.items() if "skipped" not in note}
    assert len(done) == 7  # the stem and the six 3x3 convs of the blocks
    for note in done.values():
        assert note["params_after"] < note["params_before"]
        assert ("output_rel_error" in note) == with_data
    out = result.model
    assert sum(n.op == "Conv" and n.attrs.get("group", 1) > 1 for n in out.nodes) == 7
    assert_valid(out)
    x = {"input": images[16:]}
    assert run_model(out, x)["logits"].shape == run_model(model, x)["logits"].shape == (8, 10)
    assert [t.name for t in out.outputs] == ["logits"]
