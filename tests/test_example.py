"""Tests for the bundled example: the shipped digits CNN and its data agree with each
other, and tailor's IR and lossless passes handle a real exported model.

No torch: the files under examples/ are checked as shipped (regenerate them with
examples/make_digits_cnn.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tailor.ir import Model
from tailor.ir.dependency import dependency_graph
from tailor.ir.ort import make_session, run_model
from tests.helpers import assert_equivalent, assert_valid, op_types, run_passes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL_PATH = EXAMPLES / "digits_cnn.onnx"
DATA_PATH = EXAMPLES / "digits.npz"
MAX_BYTES = 1 << 20


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load(MODEL_PATH)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    with np.load(DATA_PATH, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def fused(model: Model) -> Model:
    return run_passes(model, "fuse")


def accuracy(model: Model, x: np.ndarray, y: np.ndarray) -> float:
    logits = run_model(make_session(model), {"input": x})["logits"]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def test_files_are_small():
    assert MODEL_PATH.stat().st_size < MAX_BYTES
    assert DATA_PATH.stat().st_size < MAX_BYTES // 2


def test_model_structure(model: Model):
    ops = Counter(op_types(model))
    assert ops["BatchNormalization"] == ops["Conv"] == 6
    assert ops["Add"] == 1  # the residual block
    assert ops["GlobalAveragePool"] == ops["Flatten"] == 1 and ops["Gemm"] == 2
    depthwise = [n for n in model.nodes if n.op == "Conv" and n.attrs.get("group", 1) > 1]
    assert len(depthwise) == 1 and depthwise[0].attrs["group"] == 32
    assert [t.name for t in model.inputs] == ["input"]
    assert [t.name for t in model.outputs] == ["logits"]
    assert model.inputs[0].shape == ["batch", 1, 16, 16]  # dynamic batch
    assert model.opset == 17
    assert {"producer", "dataset", "preprocessing", "test_accuracy"} <= set(model.metadata)


def test_model_is_valid_and_runs(model: Model, data):
    assert_valid(model)
    logits = run_model(make_session(model), {"input": data["test_x"][:3]})["logits"]
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))


def test_data_matches_model(model: Model, data):
    assert set(data) == {"calib_x", "test_x", "test_y"}
    calib, x, y = data["calib_x"], data["test_x"], data["test_y"]
    assert calib.dtype == x.dtype == np.float32 and y.dtype == np.int64
    assert calib.shape == (256, 1, 16, 16)
    assert x.shape[1:] == (1, 16, 16) and y.shape == (len(x),) and len(x) >= 300
    assert set(np.unique(y)) == set(range(10))
    # Standardised with the training statistics: close to zero mean and unit variance.
    for arr in (calib, x):
        assert abs(float(arr.mean())) < 0.1 and abs(float(arr.std()) - 1) < 0.1


def test_accuracy_agrees_with_metadata(model: Model, data):
    stated = float(model.metadata["test_accuracy"])
    assert int(model.metadata["test_samples"]) == len(data["test_y"])
    measured = accuracy(model, data["test_x"], data["test_y"])
    assert measured >= stated - 0.005, f"measured {measured:.4f}, metadata says {stated:.4f}"
    assert measured > 0.95


def test_fuse_folds_every_batchnorm(model: Model, fused: Model):
    ops = Counter(op_types(fused))
    assert "BatchNormalization" not in ops
    assert ops["Conv"] == 6 and ops["Add"] == 1 and ops["Gemm"] == 2
    assert [t.name for t in fused.outputs] == ["logits"]
    assert fused.inputs[0].shape == ["batch", 1, 16, 16]
    assert fused.metadata == model.metadata
    assert_valid(fused)


def test_fuse_keeps_outputs_and_accuracy(model: Model, fused: Model, data):
    x, y = data["test_x"], data["test_y"]
    assert_equivalent(model, fused, inputs={"input": x}, rtol=1e-5)
    assert accuracy(fused, x, y) == accuracy(model, x, y)


def test_dependency_view_couples_the_residual(model: Model):
    groups = dependency_graph(model.copy().infer_shapes()).groups
    # The Add ties the channels of the downsampling conv to those of the block's last conv.
    residual = [g for g in groups if "/res/conv2/conv2.0/Conv" in g.producers]
    assert len(residual) == 1 and residual[0].prunable
    assert "/down/down.0/Conv" in residual[0].producers
    # The depthwise conv carries those channels through to the pointwise conv.
    assert "/dw/dw.0/Conv" in residual[0].carriers
    assert "/pw/pw.0/Conv" in residual[0].consumers
