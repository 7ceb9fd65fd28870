"""Tests for tucker2 (k x k Conv into 1x1 -> k x k core -> 1x1) and EVBMF rank estimation.

Full ranks (rank=1.0, force=true) must be exact to 1e-5 relative; below them the error is
reported per layer (weight space without data, output space with data).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tailor.errors import ParameterError
from tailor.ir import Model, run_model
from tailor.passes import PassContext, PassManager
from tailor.passes._lowrank_math import energy_rank, evbmf_rank
from tailor.passes.tucker2 import Tucker2, tucker2_decompose, tucker2_reconstruct
from tests.helpers import (
    ARCHITECTURE_NAMES,
    assert_equivalent,
    assert_valid,
    make_model,
    op_types,
    run_passes,
)


def tucker(model: Model, data=None, **config):
    return Tucker2(**config).run(model.copy(), PassContext(calibration=data))


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


def planted(cout: int, cin: int, k: int, r_out: int, r_in: int, noise: float, seed: int = 0):
    """A Conv weight of multilinear rank (r_out, r_in) plus noise."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal((r_out, r_in, k, k))
    u_out = np.linalg.qr(rng.standard_normal((cout, r_out)))[0]
    u_in = np.linalg.qr(rng.standard_normal((cin, r_in)))[0]
    w = np.einsum("ri...,or,ci->oc...", core, u_out, u_in)
    return (w + noise * rng.standard_normal(w.shape)).astype(np.float32)


# ---------------------------------------------------------------------- structure and exactness
@pytest.mark.parametrize("bias", [True, False])
def test_conv_becomes_three_convs_exact_at_full_rank(bias):
    model = conv_model(
        "pads=[1,0,2,1], strides=[2,1], dilations=[1,2]", "8,6,3,3", "N,6,9,9", "N,8,5,6", bias
    )
    result = tucker(model, rank=1.0, force=True)
    out = result.model
    assert op_types(out) == ["Conv", "Conv", "Conv"]
    first, core, last = out.nodes
    shapes = [out.constant_value(n.inputs[1]).shape for n in out.nodes]
    assert shapes == [(6, 6, 1, 1), (8, 6, 3, 3), (8, 8, 1, 1)]
    # the core keeps the geometry, the 1x1s have none; the bias goes last
    assert core.attrs["strides"] == [2, 1] and core.attrs["dilations"] == [1, 2]
    assert core.attrs["pads"] == [1, 0, 2, 1]
    assert "pads" not in first.attrs and "strides" not in last.attrs
    assert len(last.inputs) == (3 if bias else 2) and len(first.inputs) == len(core.inputs) == 2
    assert [t.name for t in out.outputs] == ["y"]
    note = result.layer_notes["Conv_0"]
    assert note["ranks"] == {"in": 6, "out": 8} and note["full_rank"] == {"in": 6, "out": 8}
    assert note["weight_rel_error"] < 1e-12
    # lossless at full ranks: 1e-5 relative
    assert_equivalent(model, out)
    assert_valid(out)


@pytest.mark.parametrize(
    ("attrs", "wshape", "xshape", "yshape"),
    [
        ("pads=[2,1], strides=[2]", "10,7,5", "N,7,20", "N,10,10"),  # Conv1d
        ("pads=[1,1,1,1,1,1]", "6,5,3,3,3", "N,5,4,5,6", "N,6,4,5,6"),  # Conv3d
        ('auto_pad="SAME_UPPER", strides=[2,2]', "8,6,3,3", "N,6,7,7", "N,8,4,4"),
    ],
)
def test_other_dimensions_and_auto_pad_are_exact(attrs, wshape, xshape, yshape):
    model = conv_model(attrs, wshape, xshape, yshape)
    out = tucker(model, rank=1.0, force=True).model
    assert op_types(out) == ["Conv", "Conv", "Conv"]
    assert_equivalent(model, out)
    assert_valid(out)


def test_truncated_ranks_report_the_error_of_the_spliced_weights():
    model = conv_model("pads=[1,1,1,1]", "16,12,3,3", "N,12,6,6", "N,16,6,6")
    result = tucker(model, rank=0.5)
    out = result.model
    note = result.layer_notes["Conv_0"]
    assert note["ranks"] == {"in": 6, "out": 8}
    assert note["params_before"] == 16 * 12 * 9 + 16
    assert note["params_after"] == 12 * 6 + 8 * 6 * 9 + 16 * 8 + 16
    # the reported error is the error of the weights actually in the graph
    a, g, c = (out.constant_value(n.inputs[1]).astype(np.float64) for n in out.nodes)
    approx = np.einsum("ri...,or,ic->oc...", g, c[:, :, 0, 0], a[:, :, 0, 0])
    w = model.constant_value(model.nodes[0].inputs[1])
    rel = np.linalg.norm(w - approx) / np.linalg.norm(w)
    assert note["weight_rel_error"] == pytest.approx(rel, rel=1e-5)
    assert f"weight rel. error {rel:.2e}" in result.changes[1]
    assert_valid(out)


def test_hooi_improves_on_hosvd():
    w = randn(16, 12, 3, 3, seed=4).astype(np.float64)
    errors = []
    for iterations in (0, 5):
        core, u_out, u_in = tucker2_decompose(w, 5, 4, iterations)
        approx = tucker2_reconstruct(core, u_out, u_in)
        errors.append(np.linalg.norm(w - approx))
    assert errors[1] <= errors[0] + 1e-12


def test_integer_ranks_are_capped_per_mode():
    model = conv_model("pads=[1,1,1,1]", "16,4,3,3", "N,4,6,6", "N,16,6,6")
    note = tucker(model, rank=6, force=True).layer_notes["Conv_0"]
    assert note["ranks"] == {"in": 4, "out": 6}


# ---------------------------------------------------------------------- rank methods
def test_evbmf_recovers_a_planted_rank():
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((60, 5)) @ rng.standard_normal((5, 90))
    noisy = signal + 0.1 * rng.standard_normal((60, 90))
    assert evbmf_rank(noisy) == 5
    assert evbmf_rank(noisy.T) == 5
    assert evbmf_rank(rng.standard_normal((60, 90))) <= 2  # pure noise
    assert evbmf_rank(np.zeros((4, 6))) == 0


def test_vbmf_finds_the_multilinear_ranks():
    w = planted(24, 16, 3, r_out=5, r_in=3, noise=0.02)
    model = conv_model("pads=[1,1,1,1]", "24,16,3,3", "N,16,6,6", "N,24,6,6")
    model.nodes[0].inputs[1] = model.add_constant("planted", w)
    result = tucker(model, method="vbmf")
    note = result.layer_notes["Conv_0"]
    assert note["ranks"] == {"in": 3, "out": 5}
    assert note["method"] == "vbmf"
    assert note["weight_rel_error"] < 0.15  # about the planted noise
    assert_valid(result.model)


def test_energy_method_ranks_each_unfolding():
    w = planted(24, 16, 3, r_out=6, r_in=4, noise=0.05, seed=2).astype(np.float64)
    model = conv_model("pads=[1,1,1,1]", "24,16,3,3", "N,16,6,6", "N,24,6,6")
    model.nodes[0].inputs[1] = model.add_constant("planted", w.astype(np.float32))
    result = tucker(model, energy=0.9)
    s0 = np.linalg.svd(w.reshape(24, -1), compute_uv=False)
    s1 = np.linalg.svd(np.moveaxis(w, 1, 0).reshape(16, -1), compute_uv=False)
    note = result.layer_notes["Conv_0"]
    assert note["ranks"] == {"in": energy_rank(s1, 0.9), "out": energy_rank(s0, 0.9)}
    assert note["method"] == "energy"
    assert Tucker2(energy=0.9).to_text() == "tucker2(energy=0.9)"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"method": "energy"}, "needs energy"),
        ({"method": "vbmf", "energy": 0.8}, "conflicts"),
        ({"method": "cp"}, "not one of"),
        ({"rank": 1.5}, "fractional rank"),
    ],
)
def test_parameters_are_validated(config, message):
    with pytest.raises(ParameterError, match=message):
        Tucker2(**config)


# ---------------------------------------------------------------------- must not apply
@pytest.mark.parametrize(
    ("attrs", "wshape", "reason"),
    [
        ("", "8,6,1,1", "1x1"),
        ("pads=[1,1,1,1], group=2", "8,3,3,3", "grouped"),
        ("pads=[1,1,1,1], group=6", "6,1,3,3", "grouped"),
    ],
)
def test_must_not_apply(attrs, wshape, reason):
    cout = int(wshape.split(",")[0])
    model = conv_model(attrs, wshape, "N,6,5,5", f"N,{cout},5,5")
    result = tucker(model, rank=0.5, force=True)
    assert not result.modified
    assert op_types(result.model) == ["Conv"]
    assert reason in result.layer_notes["Conv_0"]["skipped"]


def test_no_saving_is_skipped_unless_forced():
    model = conv_model("pads=[1,1,1,1]", "8,6,3,3", "N,6,5,5", "N,8,5,5")
    result = tucker(model, rank=1.0)
    assert not result.modified
    # 6*6 + 8*6*9 + 8*8 + 8 = 540 params for 8*6*9 + 8 = 440
    assert "540 params for 440 (1.23x)" in result.layer_notes["Conv_0"]["skipped"]


def test_strided_layer_whose_macs_do_not_drop_is_skipped_unless_forced():
    # Stride 2: the first 1x1 runs on the 16x16 input, four times the output's pixels.
    model = conv_model("pads=[1,1,1,1], strides=[2,2]", "8,8,3,3", "N,8,16,16", "N,8,8,8")
    result = tucker(model, rank=6)
    assert not result.modified
    # params 8*6 + 6*6*9 + 8*6 + 8 = 428 of 584 (0.73x) pass; MACs do not:
    # 256*48 + 64*324 + 64*48 = 36,096 of 64*576 = 36,864 (0.98x).
    skipped = result.layer_notes["Conv_0"]["skipped"]
    assert "428 params for 584 (0.73x), 36,096 MACs for 36,864 (0.98x)" in skipped
    assert "force=true" in skipped
    forced = tucker(model, rank=6, force=True)
    note = forced.layer_notes["Conv_0"]
    assert forced.modified and op_types(forced.model) == ["Conv"] * 3
    assert (note["macs_before"], note["macs_after"]) == (36864, 36096)
    assert "0.98x" in note["forced"]
    # Without the stride the same ranks cost 0.73x of both, and apply.
    flat = conv_model("pads=[1,1,1,1]", "8,8,3,3", "N,8,8,8", "N,8,8,8")
    note = tucker(flat, rank=6).layer_notes["Conv_0"]
    assert note["macs_after"] == 64 * (48 + 324 + 48) and "forced" not in note
    assert_valid(forced.model)


# ---------------------------------------------------------------------- data
def test_with_data_output_error_and_bias_correction():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,10,10] x) => (float[N,16,5,5] y) <float[12,3,3,3] w0, float[12] b0, float[16,12,3,3] w, float[16] b> {
          h = Conv <pads=[1,1,1,1]> (x, w0, b0)
          r = Relu (h)
          y = Conv <pads=[1,1,1,1], strides=[2,2]> (r, w, b)
        }
        """
    )
    x = {"x": randn(32, 3, 10, 10, seed=3)}
    raw = tucker(model, x, rank=0.4, bias_correction=False, layers="Conv_1")
    fixed = tucker(model, x, rank=0.4, layers="Conv_1")
    note = fixed.layer_notes["Conv_1"]
    assert note["bias_corrected"] is True and "Conv_0" not in fixed.layer_notes
    assert 0.0 < note["output_rel_error"] < raw.layer_notes["Conv_1"]["output_rel_error"]
    assert "output rel. error" in fixed.changes[1]
    y0, y1 = run_model(model, x)["y"], run_model(fixed.model, x)["y"]
    np.testing.assert_allclose((y0 - y1).mean(axis=(0, 2, 3)), 0.0, atol=1e-3)
    assert_valid(fixed.model)


def test_through_the_pass_manager():
    model = conv_model("pads=[1,1,1,1]", "16,12,3,3", "N,12,6,6", "N,16,6,6")
    out = run_passes(model, "tucker2(rank=0.25)")
    assert op_types(out) == ["Conv", "Conv", "Conv"]


# ---------------------------------------------------------------------- architectures
NAMES = ARCHITECTURE_NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_applicable_layer_of_real_architectures(name: str, arch_path: Callable[[str], Path]):
    model = Model.load(arch_path(name))
    images = randn(24, 3, 32, 32, seed=11)
    data = {"input": images[:16]} if name in ("resnet18", "densenet", "googlenet") else None
    pipeline = "fuse,tucker2(method=vbmf)" if name == "resnet50" else "fuse,tucker2(rank=0.5)"
    result = PassManager.from_text(pipeline).run(model, PassContext(calibration=data))
    out = result.model
    record = result.records[-1]
    assert record.modified  # every family has at least one ordinary k x k conv
    done = [n for n, note in record.layer_notes.items() if "skipped" not in note]
    assert done
    for layer in done:
        note = record.layer_notes[layer]
        assert note["params_after"] < note["params_before"]
        if data is not None:
            assert 0.0 <= note["output_rel_error"] < 1.0
    assert_valid(out)
    x = {"input": images[16:]}
    before, after = run_model(model, x)["logits"], run_model(out, x)["logits"]
    assert after.shape == before.shape == (8, 10)
    assert [t.name for t in out.outputs] == ["logits"]
    assert out.shape(out.inputs[0])[0] == "N"
