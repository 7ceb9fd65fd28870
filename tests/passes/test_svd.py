"""Tests for svd (Gemm/MatMul into two thin layers) and the shared low-rank machinery:
rank resolution, the cost margin, the data-aware (whitened) fit and bias correction
through the pass (the correction itself: tests/passes/test_lowrank_bias.py).

Full rank (rank=1.0, force=true) must be exact to 1e-5 relative; below it the error is
reported per layer (weight space without data, output space with data).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tailor.errors import ParameterError
from tailor.ir import Model, run_model
from tailor.ir.layers import summarize
from tailor.passes import PassContext, PassManager
from tailor.passes._lowrank_math import energy_rank, resolve_rank
from tailor.passes.svd import SVD
from tests.helpers import (
    ARCHITECTURE_NAMES,
    assert_equivalent,
    assert_valid,
    make_model,
    op_types,
    run_passes,
)


def svd(model: Model, data=None, **config):
    return SVD(**config).run(model.copy(), PassContext(calibration=data))


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def output_error(a: Model, b: Model, feeds: dict[str, np.ndarray]) -> float:
    ya, yb = (next(iter(run_model(m, feeds).values())).astype(np.float64) for m in (a, b))
    return float(np.linalg.norm(ya - yb) / np.linalg.norm(ya))


def gemm_model(attrs: str = "", bias: str = "c", opset: int = 13, trans_b: bool = True) -> Model:
    wshape = "12,20" if trans_b else "20,12"
    inputs = "x, w" + (f", {bias}" if bias else "")
    decl = f", float[12] {bias}" if bias == "c" else (", float[1,12] c2" if bias == "c2" else "")
    sep = ", " if attrs else ""
    return make_model(
        f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[N,20] x) => (float[N,12] y) <float[{wshape}] w{decl}> {{
          y = Gemm <transB={int(trans_b)}{sep}{attrs}> ({inputs})
        }}
        """
    )


# ---------------------------------------------------------------------- structure and exactness
@pytest.mark.parametrize(
    ("attrs", "bias", "trans_b"),
    [
        ("", "c", True),
        ("alpha=0.5, beta=2.0", "c", True),
        ("alpha=1.5", "", False),
        ("beta=0.25", "c2", False),
    ],
)
def test_gemm_becomes_two_gemms_exact_at_full_rank(attrs, bias, trans_b):
    model = gemm_model(attrs, bias, trans_b=trans_b)
    result = svd(model, rank=1.0, force=True)
    out = result.model
    assert result.modified
    assert op_types(out) == ["Gemm", "Gemm"]
    first, second = out.nodes
    a, b = (out.constant_value(n.inputs[1]) for n in out.nodes)
    # transB is kept on both factors, alpha folded into the first, C and beta on the second
    assert first.attrs["transB"] == second.attrs["transB"] == int(trans_b)
    assert "alpha" not in first.attrs and "alpha" not in second.attrs
    assert a.shape == ((12, 20) if trans_b else (20, 12))
    assert b.shape == ((12, 12) if trans_b else (12, 12))
    assert len(second.inputs) == (3 if bias else 2)
    assert [t.name for t in out.outputs] == ["y"]
    note = result.layer_notes["Gemm_0"]
    assert note["rank"] == note["full_rank"] == 12
    assert note["weight_rel_error"] < 1e-12
    # lossless at full rank: 1e-5 relative
    assert_equivalent(model, out)
    assert_valid(out)


def test_gemm_before_opset_11_uses_a_matmul_first_factor():
    # Gemm-9 requires C: the first factor cannot be a Gemm without a bias.
    model = gemm_model("alpha=2.0", "c", opset=9)
    out = svd(model, rank=1.0, force=True).model
    assert op_types(out) == ["MatMul", "Gemm"]
    assert_equivalent(model, out)
    assert_valid(out)


def test_matmul_on_tokens_keeps_the_bias_add():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,T,24] x) => (float[N,T,16] y) <float[24,16] w, float[16] b> {
          h = MatMul (x, w)
          y = Add (h, b)
        }
        """
    )
    result = svd(model, rank=1.0, force=True)
    out = result.model
    assert op_types(out) == ["MatMul", "MatMul", "Add"]
    shapes = [out.constant_value(n.inputs[1]).shape for n in out.nodes[:2]]
    assert shapes == [(24, 16), (16, 16)]
    feeds = {"x": randn(2, 7, 24)}
    assert_equivalent(model, out, inputs=feeds)
    assert_valid(out)


def test_matmul_with_the_weight_first():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,20,5] x) => (float[N,12,5] y) <float[12,20] w> {
          y = MatMul (w, x)
        }
        """
    )
    full = svd(model, rank=1.0, force=True).model
    assert op_types(full) == ["MatMul", "MatMul"]
    assert [n.inputs[1].name for n in full.nodes][0] == "x"  # W @ x: the weight stays first
    assert_equivalent(model, full, inputs={"x": randn(3, 20, 5)})
    low = svd(model, rank=3)
    assert low.model.constant_value(low.model.nodes[0].inputs[0]).shape == (3, 20)
    assert_valid(low.model)


def test_graph_output_read_by_another_node_keeps_its_name():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,32] x) => (float[N,32] h, float[N,32] y) <float[32,32] w, float[32] c> {
          h = Gemm (x, w, c)
          y = Relu (h)
        }
        """
    )
    out = svd(model, rank=4).model
    assert [t.name for t in out.outputs] == ["h", "y"]
    assert op_types(out) == ["Gemm", "Gemm", "Relu"]
    assert_valid(out)


# ---------------------------------------------------------------------- ranks and reported error
def test_truncated_rank_reports_the_weight_error_of_the_dropped_singular_values():
    model = gemm_model("alpha=0.5")
    w = 0.5 * model.constant_value(model.nodes[0].inputs[1]).astype(np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    result = svd(model, rank=0.25)
    note = result.layer_notes["Gemm_0"]
    assert note["rank"] == 3  # ceil(0.25 * 12)
    assert note["params_before"] == 12 * 20 + 12
    assert note["params_after"] == 3 * (12 + 20) + 12
    expected = np.sqrt(np.sum(s[3:] ** 2) / np.sum(s**2))
    assert note["weight_rel_error"] == pytest.approx(expected, rel=1e-6)
    assert "output_rel_error" not in note
    assert "weight rel. error" in result.changes[1]
    assert any("no calibration data" in line for line in result.changes)
    assert summarize(result.model).params < summarize(model).params
    assert_valid(result.model)


def test_rank_resolution():
    assert resolve_rank(0.25, 12) == 3
    assert resolve_rank(1.0, 12) == 12
    assert resolve_rank(0.01, 12) == 1
    assert resolve_rank(5, 12) == 5
    assert resolve_rank(50, 12) == 12
    s = np.array([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    assert energy_rank(s, 0.7) == 1
    assert energy_rank(s, 16 / 22) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 1.0) == 4


def test_energy_overrides_rank():
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    s = np.array([10.0, 6.0, 3.0, 1.0] + [0.1] * 26)
    w = (u[:, :30] * s) @ v.T
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,40] x) => (float[N,30] y) <float[40,30] w> { y = MatMul (x, w) }
        """,
        {"w": w.astype(np.float32)},
    )
    result = svd(model, rank=20, energy=0.95)
    note = result.layer_notes["MatMul_0"]
    assert note["rank"] == energy_rank(s, 0.95) == 3
    assert note["energy"] == 0.95


def test_parameters_are_validated():
    with pytest.raises(ParameterError, match="energy"):
        SVD(energy=1.5)
    with pytest.raises(ParameterError, match="rank"):
        SVD(rank=0)
    assert SVD(rank=0.5, data_aware=True).to_text() == "svd(rank=0.5,data_aware=true)"


# ---------------------------------------------------------------------- must not apply
def test_negligible_saving_is_skipped_unless_forced():
    model = gemm_model()  # 20 -> 12 with a bias: 252 params, 240 MACs
    result = svd(model, rank=1.0)  # 12 >= 20*12/32 = 7.5, the break-even rank
    assert not result.modified
    assert op_types(result.model) == ["Gemm"]
    assert "396 params for 252 (1.57x)" in result.layer_notes["Gemm_0"]["skipped"]
    # Rank 7 is below break-even but saves under 10 %: 7*32 + 12 = 236 params (0.94x).
    result = svd(model, rank=7)
    assert not result.modified
    skipped = result.layer_notes["Gemm_0"]["skipped"]
    assert "236 params for 252 (0.94x), 224 MACs for 240 (0.93x)" in skipped
    assert "not below 0.9x" in skipped and "force=true" in skipped
    forced = svd(model, rank=7, force=True)
    note = forced.layer_notes["Gemm_0"]
    assert forced.modified and op_types(forced.model) == ["Gemm", "Gemm"]
    assert note["params_after"] == 236 and (note["macs_before"], note["macs_after"]) == (240, 224)
    assert "0.94x" in note["forced"]
    # Rank 6 saves enough: 204 params (0.81x), 192 MACs (0.80x).
    note = svd(model, rank=6).layer_notes["Gemm_0"]
    assert note["params_after"] == 204 and "forced" not in note


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "y = Gemm <transA=1> (xt, w)",
            "transA=1",
        ),
        (
            "h = MatMul (x, w)\n y = MatMul (h, w2)\n z = MatMul (x, w)",
            "shared",
        ),
    ],
)
def test_must_not_apply(text, reason):
    model = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,32] x, float[32,N] xt) => (float[N,32] y, float[N,32] z) <float[32,32] w, float[32,32] w2> {{
          {text}
          {"z = Relu (y)" if "z =" not in text else ""}
        }}
        """
    )
    result = svd(model, rank=2)
    first = next(n.name for n in model.nodes if n.op in ("Gemm", "MatMul"))
    assert reason in result.layer_notes[first]["skipped"]
    assert first in {n.name for n in result.model.nodes}


def test_batched_weight_and_selector():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[4,8,32] x) => (float[4,8,32] y) <float[4,32,32] wb, float[32,32] w> {
          h = MatMul (x, wb)
          y = MatMul (h, w)
        }
        """
    )
    result = svd(model, rank=2)
    assert "2-D" in result.layer_notes["MatMul_0"]["skipped"]
    assert op_types(result.model) == ["MatMul", "MatMul", "MatMul"]
    untouched = svd(model, rank=2, layers="!MatMul_1")
    assert not untouched.modified


# ---------------------------------------------------------------------- data-aware fit
def correlated(n: int, d: int, seed: int) -> np.ndarray:
    """Inputs whose features are strongly correlated (a few directions dominate)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * (0.6 ** np.arange(d))[:, None]
    return (rng.standard_normal((n, d)) @ mix).astype(np.float32)


def test_data_aware_beats_plain_svd_on_held_out_inputs():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,32] x) => (float[N,24] y) <float[24,32] w, float[24] c> {
          y = Gemm <transB=1> (x, w, c)
        }
        """
    )
    x = correlated(400, 32, seed=1)
    calib, held_out = {"x": x[:256]}, {"x": x[256:]}
    plain = svd(model, calib, rank=4, bias_correction=False)
    aware = svd(model, calib, rank=4, data_aware=True, bias_correction=False)
    note = aware.layer_notes["Gemm_0"]
    assert note["data_aware"] is True and note["calibration_rows"] == 128
    assert note["output_rel_error"] < 0.5 * plain.layer_notes["Gemm_0"]["output_rel_error"]
    e_plain = output_error(model, plain.model, held_out)
    e_aware = output_error(model, aware.model, held_out)
    assert e_aware < 0.5 * e_plain, (e_plain, e_aware)
    # the weight itself is fitted worse: the error moved to where the data never go
    assert note["weight_rel_error"] > plain.layer_notes["Gemm_0"]["weight_rel_error"]
    assert_valid(aware.model)


def test_data_aware_is_exact_at_full_rank():
    model = gemm_model("alpha=0.5")
    x = correlated(64, 20, seed=2)
    out = svd(model, {"x": x}, rank=1.0, force=True, data_aware=True).model
    assert_equivalent(model, out, inputs={"x": x})


def test_data_aware_with_weight_first_matmul():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,16,6] x) => (float[N,12,6] y) <float[12,16] w> { y = MatMul (w, x) }
        """
    )
    x = np.swapaxes(correlated(20 * 6, 16, seed=4).reshape(20, 6, 16), 1, 2).copy()
    plain = svd(model, {"x": x}, rank=3, bias_correction=False).layer_notes["MatMul_0"]
    aware = svd(model, {"x": x}, rank=3, data_aware=True, bias_correction=False)
    assert aware.layer_notes["MatMul_0"]["calibration_rows"] == 120
    assert aware.layer_notes["MatMul_0"]["output_rel_error"] < plain["output_rel_error"]
    assert_valid(aware.model)


def test_data_aware_without_data_falls_back_and_says_so():
    result = svd(gemm_model(), rank=2, data_aware=True)
    assert result.modified
    assert result.layer_notes["Gemm_0"]["data_aware"] is False
    assert any("plain SVD" in line for line in result.changes)


# ---------------------------------------------------------------------- bias correction
def shifted_inputs(n: int, d: int, seed: int = 5) -> np.ndarray:
    """Non-negative inputs (after a ReLU): their mean makes a low-rank layer biased."""
    return np.maximum(randn(n, d, seed=seed) + 0.5, 0.0)


@pytest.mark.parametrize("bias", ["c", ""])
def test_bias_correction_removes_the_mean_output_error(bias):
    model = gemm_model("", bias)
    x = {"x": shifted_inputs(128, 20)}
    raw = svd(model, x, rank=3, bias_correction=False)
    fixed = svd(model, x, rank=3)
    assert fixed.layer_notes["Gemm_0"]["bias_corrected"] is True
    assert raw.layer_notes["Gemm_0"]["bias_corrected"] is False
    assert (
        fixed.layer_notes["Gemm_0"]["output_rel_error"]
        < raw.layer_notes["Gemm_0"]["output_rel_error"]
    )
    y = run_model(model, x)["y"].astype(np.float64)
    y_fixed = run_model(fixed.model, x)["y"].astype(np.float64)
    y_raw = run_model(raw.model, x)["y"].astype(np.float64)
    assert np.abs((y - y_raw).mean(axis=0)).max() > 0.05
    np.testing.assert_allclose((y - y_fixed).mean(axis=0), 0.0, atol=1e-4)
    # without a C the correction creates one, and it counts in the layer's parameters
    assert fixed.layer_notes["Gemm_0"]["params_after"] == 3 * (20 + 12) + 12
    assert_valid(fixed.model)


# ---------------------------------------------------------------------- pipeline and architectures
def test_through_the_pass_manager_and_pipeline_text():
    model = gemm_model()
    out = run_passes(model, "svd(rank=2)")
    assert op_types(out) == ["Gemm", "Gemm"]
    pm = PassManager.from_text("svd(rank=0.25,energy=0.9,data_aware=true,bias_correction=false)")
    assert PassManager.from_text(pm.to_text()).to_text() == pm.to_text()


NAMES = ARCHITECTURE_NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_applicable_layer_of_real_architectures(name: str, arch_path: Callable[[str], Path]):
    model = Model.load(arch_path(name))
    images = randn(24, 3, 32, 32, seed=11)
    data = {"input": images[:16]} if name in ("resnet18", "mobilenet_v3", "vgg") else None
    result = PassManager.from_text("fuse,svd(rank=0.5)").run(model, PassContext(calibration=data))
    out = result.model
    record = result.records[-1]
    gemms = [n for n in model.nodes if n.op in ("Gemm", "MatMul")]
    # squeezenet ends in a 1x1 Conv classifier: no Gemm/MatMul to factor
    assert record.modified == bool(gemms)
    for name_, note in record.layer_notes.items():
        assert "skipped" in note or note["params_after"] < note["params_before"], name_
        if data is not None and "skipped" not in note:
            assert 0.0 <= note["output_rel_error"] < 1.0
    assert_valid(out)
    x = {"input": images[16:]}
    before, after = run_model(model, x)["logits"], run_model(out, x)["logits"]
    assert after.shape == before.shape == (8, 10)
    assert [t.name for t in out.outputs] == ["logits"]
    assert out.shape(out.inputs[0])[0] == "N"
