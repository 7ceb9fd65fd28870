"""Tests for compare: identical models, a perturbed weight with a known error, the max_rel
definition, tolerances, NaN handling and mismatched models."""

from __future__ import annotations

import numpy as np
import pytest

from tailor.errors import VerificationError
from tailor.ir import Comparison, Model, compare
from tests.helpers import make_model

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,6] x) => (float[N,4] y) <float[6,4] w> {
  y = MatMul (x, w)
}
"""


@pytest.fixture(scope="module")
def model() -> Model:
    return make_model(TEXT)


def with_weight(model: Model, w: np.ndarray) -> Model:
    out = model.copy()
    out.nodes[0].inputs[1].values = w.astype(np.float32)
    return out


def weight(model: Model) -> np.ndarray:
    return np.asarray(model.nodes[0].inputs[1].values)


def test_identical_models(model):
    cmp = compare(model, model.copy())
    assert (cmp.max_abs, cmp.max_rel) == (0.0, 0.0)
    assert cmp.per_output == {"y": (0.0, 0.0)}
    assert cmp.within(0.0, 0.0)
    assert str(cmp) == "max abs error 0, max relative error 0"


def test_perturbed_weight_gives_the_expected_error(model):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    w = weight(model)
    delta = np.float32(0.125)
    w2 = w.copy()
    w2[2, 1] += delta
    cmp = compare(model, with_weight(model, w2), {"x": x})
    # only column 1 changes, by x[:, 2] * delta
    expected_abs = float(np.max(np.abs(x[:, 2]))) * float(delta)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert cmp.max_abs == pytest.approx(expected_abs, rel=1e-5)
    assert cmp.max_rel == pytest.approx(expected_abs / np.max(np.abs(ref)), rel=1e-5)
    assert cmp.per_output["y"] == (cmp.max_abs, cmp.max_rel)
    assert str(cmp) == f"max abs error {cmp.max_abs:.3g}, max relative error {cmp.max_rel:.3g}"


def test_max_rel_is_relative_to_the_output_scale(model):
    """max_rel = max|a - b| / max|a|: scaling both outputs leaves it unchanged, and a zero
    reference element does not make it explode."""
    x = np.array([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32)
    w = np.zeros((6, 4), np.float32)
    w[0] = [10, 0, -20, 5]
    w2 = w.copy()
    w2[0, 1] = 0.5  # the reference is 0 here: elementwise relative error would be inf
    cmp = compare(with_weight(model, w), with_weight(model, w2), {"x": x})
    assert cmp.max_abs == pytest.approx(0.5)
    assert cmp.max_rel == pytest.approx(0.5 / 20)
    scaled = compare(with_weight(model, 100 * w), with_weight(model, 100 * w2), {"x": x})
    assert scaled.max_rel == pytest.approx(cmp.max_rel)
    assert scaled.max_abs == pytest.approx(100 * cmp.max_abs)


def test_zero_reference(model):
    x = np.zeros((2, 6), np.float32)
    w = weight(model)
    assert compare(model, with_weight(model, 2 * w), {"x": x}).max_rel == 0.0  # both zero
    zero = with_weight(model, np.zeros_like(w))
    cmp = compare(zero, model, {"x": np.ones((2, 6), np.float32)})
    assert cmp.max_rel == float("inf") and cmp.max_abs > 0
    assert cmp.within(atol=cmp.max_abs) and not cmp.within(rtol=1e6)


@pytest.mark.parametrize(
    ("per_output", "rtol", "atol", "ok"),
    [
        ({"a": (1e-3, 1e-6)}, 1e-5, 0.0, True),  # relative within
        ({"a": (1e-3, 1e-2)}, 1e-5, 1e-3, True),  # absolute within
        ({"a": (1e-3, 1e-2)}, 1e-5, 1e-4, False),
        ({"a": (0.0, 0.0), "b": (1.0, 1.0)}, 0.5, 0.5, False),  # every output must pass
        ({}, 0.0, 0.0, True),
    ],
)
def test_within(per_output, rtol, atol, ok):
    cmp = Comparison(
        max(v[0] for v in per_output.values()) if per_output else 0.0,
        max(v[1] for v in per_output.values()) if per_output else 0.0,
        per_output,
    )
    assert cmp.within(rtol, atol) is ok


def test_several_outputs_matched_by_position_and_worst_wins():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,4] x) => (float[N,4] {a}, float[N,4] {b}) <float[4] s> {{
      {a} = Mul (x, s)
      {b} = Add (x, s)
    }}
    """
    s = np.array([1, 2, 3, 4], np.float32)
    ref = make_model(text.format(a="p", b="q"), {"s": s})
    cand = make_model(text.format(a="u", b="v"), {"s": s + np.float32(0.25)})
    x = np.ones((3, 4), np.float32)
    cmp = compare(ref, cand, {"x": x})
    assert list(cmp.per_output) == ["p", "q"]  # named after the reference
    assert cmp.per_output["p"] == pytest.approx((0.25, 0.25 / 4))
    assert cmp.per_output["q"] == pytest.approx((0.25, 0.25 / 5))
    assert cmp.max_rel == pytest.approx(0.25 / 4)


def test_random_inputs_are_seeded_and_batched():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,6] x) => (float[N,4] y) <float[6,4] w> {
          y = MatMul (x, w)
        }
        """
    )
    other = with_weight(model, weight(model) * 1.01)
    a = compare(model, other, seed=1)
    assert compare(model, other, seed=1).max_abs == a.max_abs
    assert compare(model, other, seed=2).max_abs != a.max_abs
    assert compare(model, other, batch=7, seed=1).max_abs >= 0


def test_candidate_without_an_unused_input():
    """A rewrite may drop an input no output depends on: feeds are matched by name."""
    ref = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4] x, float[N,4] unused) => (float[N,4] y) {
          y = Relu (x)
        }
        """
    )
    cand = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4] x) => (float[N,4] y) {
          y = Relu (x)
        }
        """
    )
    assert compare(ref, cand).max_abs == 0.0


def test_nan_in_both_is_agreement_nan_in_one_is_not():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,4] x) => (float[N,4] y) {{
      y = {op} (x)
    }}
    """
    log = make_model(text.format(op="Log"))
    x = np.array([[-1, 0, 1, 2]], np.float32)  # NaN, -inf, 0, log 2
    cmp = compare(log, log.copy(), {"x": x})
    assert (cmp.max_abs, cmp.max_rel) == (0.0, 0.0) and cmp.within()
    # random inputs (half negative) agree too: a lossless pass on such a model passes
    assert compare(log, log.copy()).within()
    ident = make_model(text.format(op="Identity"))
    cmp = compare(log, ident, {"x": x})
    assert cmp.max_abs == float("inf") and not cmp.within(1e-5, 1e-5)
    cmp = compare(ident, log, {"x": np.array([[1, 1, 1, -1]], np.float32)})
    assert cmp.max_abs == float("inf")


@pytest.mark.parametrize(
    ("cand_text", "fragment"),
    [
        (
            "g (float[N,4] x) => (float[N,4] y, float[N,4] z) {\n y = Relu (x)\n z = Neg (x)\n}",
            "the models have 1 and 2 outputs",
        ),
        (
            "g (float[N,4] x) => (float[N,8] y) {\n y = Concat <axis=1> (x, x)\n}",
            "output 'y' has shape (2, 4) in the reference and (2, 8) in the candidate",
        ),
    ],
)
def test_mismatched_models(cand_text, fragment):
    header = '<ir_version: 8, opset_import: ["" : 13]>\n'
    ref = make_model(header + "g (float[N,4] x) => (float[N,4] y) {\n y = Relu (x)\n}")
    cand = make_model(header + cand_text)
    with pytest.raises(VerificationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        compare(ref, cand)
