"""Evaluators: top-1 accuracy, fidelity, a user's module:function, labels files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tailor.errors import EvaluatorError
from tailor.evaluate import (
    Fidelity,
    TopOneAccuracy,
    load_labels,
    load_user_evaluator,
    paired_standard_error,
    split_samples,
)
from tailor.ir import Model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def digits():
    with np.load(EXAMPLE / "digits.npz") as f:
        return Model.load(EXAMPLE / "digits_cnn.onnx"), f["test_x"], f["test_y"]


def test_top1_accuracy_of_the_example_is_its_documented_figure(digits):
    model, x, y = digits
    assert TopOneAccuracy(x, y)(model) == pytest.approx(0.9972, abs=5e-4)
    one_hot = np.eye(10)[y]
    assert TopOneAccuracy(x, one_hot)(model) == TopOneAccuracy(x, y)(model)
    with pytest.raises(EvaluatorError, match="pair up"):
        TopOneAccuracy(x, y[:-1])


def test_fidelity_is_one_for_the_model_itself_and_drops_for_a_damaged_one(digits):
    model, x, _ = digits
    fid = Fidelity(model, x[:200])
    assert fid(model) == 1.0
    damaged = model.copy()
    gemm = next(n for n in damaged.nodes if n.op == "Gemm")
    w = damaged.constant_value(gemm.inputs[1])
    gemm.inputs[1] = damaged.add_constant(
        "w_noise", (w + np.random.default_rng(0).normal(0, 1, w.shape)).astype(w.dtype)
    )
    assert fid(damaged) < 0.9


def test_user_evaluator_from_a_file(tmp_path, digits):
    model, _, _ = digits
    script = tmp_path / "myeval.py"
    script.write_text(
        "import onnx\n"
        "def score(path):\n"
        "    return float(len(onnx.load(path).graph.node))\n"
        "def bad(path):\n"
        "    return 'high'\n"
        "def boom(path):\n"
        "    raise RuntimeError('no GPU here')\n"
    )
    assert load_user_evaluator(f"{script}:score")(model) == len(model.nodes)
    with pytest.raises(EvaluatorError, match="not a number"):
        load_user_evaluator(f"{script}:bad")(model)
    with pytest.raises(EvaluatorError, match="failed: RuntimeError: no GPU here"):
        load_user_evaluator(f"{script}:boom")(model)
    with pytest.raises(EvaluatorError, match="no function 'nope'"):
        load_user_evaluator(f"{script}:nope")
    with pytest.raises(EvaluatorError, match="not module:function"):
        load_user_evaluator("justamodule")
    with pytest.raises(EvaluatorError, match="cannot import"):
        load_user_evaluator("no_such_module_xyz:f")


def test_labels_files(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 2)), y=np.arange(4))
    x, y = load_labels(tmp_path / "a.npz")
    assert x.shape == (4, 2) and list(y) == [0, 1, 2, 3]
    np.savez(tmp_path / "b.npz", imgs=np.zeros((3, 2)), cls=np.arange(3))
    with pytest.raises(EvaluatorError, match="name the arrays"):
        load_labels(tmp_path / "b.npz")
    x, y = load_labels(f"{tmp_path / 'b.npz'}:imgs,cls")
    assert len(x) == len(y) == 3
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "c.npz", x=np.array([{"a": 1}], dtype=object), y=np.arange(1))
    with pytest.raises(EvaluatorError, match="not a readable"):
        load_labels(tmp_path / "c.npz")
    with pytest.raises(EvaluatorError, match="no such file"):
        load_labels(tmp_path / "missing.npz")


def test_split_is_seeded_and_disjoint():
    a, b = split_samples((np.zeros(100),), 0.3, seed=1)
    assert len(b) == 30 and len(a) == 70 and not set(a) & set(b)
    assert (split_samples((np.zeros(100),), 0.3, seed=1)[1] == b).all()


def test_paired_standard_error_counts_only_the_samples_that_change():
    base = np.ones(400)
    assert paired_standard_error(base, base) == 0.0
    # 4 of 400 samples flip to wrong: d has mean -0.01 and variance 0.01 - 0.0001.
    worse = base.copy()
    worse[:4] = 0.0
    assert paired_standard_error(base, worse) == pytest.approx(np.sqrt(0.0099 / 400))
    # As many flip each way: no net change, but an uncertain one.
    mixed = np.r_[np.ones(200), np.zeros(200)]
    swapped = mixed.copy()
    swapped[:20], swapped[200:220] = 0.0, 1.0
    assert paired_standard_error(mixed, swapped) == pytest.approx(np.sqrt(0.1 / 400))
    # Smaller than the unpaired error of one accuracy on the same samples (0.025).
    assert paired_standard_error(mixed, swapped) < np.sqrt(0.25 / 400)


def test_per_sample_scores_average_to_the_score(digits):
    model, x, y = digits
    for evaluator in (TopOneAccuracy(x[:300], y[:300]), Fidelity(model, x[:300])):
        per = evaluator.per_sample(model)
        assert per.shape == (300,) and set(np.unique(per)) <= {0.0, 1.0}
        assert per.mean() == evaluator(model)


def test_models_are_scored_as_deployed_with_graph_optimizations(digits, monkeypatch):
    """Quantized graphs compute differently once onnxruntime fuses them into integer
    kernels (saturation on CPUs without VNNI): the score must be of what will run."""
    import tailor.evaluate as evaluate

    model, x, y = digits
    seen = []
    real = evaluate.make_session

    def spy(m, **kw):
        seen.append(kw.get("optimize", False))
        return real(m, **kw)

    monkeypatch.setattr(evaluate, "make_session", spy)
    TopOneAccuracy(x[:50], y[:50])(model)
    Fidelity(model, x[:50])(model)
    assert seen and all(seen)
