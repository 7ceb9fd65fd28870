"""Tests for the activation cache: a capture is reused exactly when nothing upstream of
the tensor (weights, attributes, inputs, data) changed, and never changes a result."""

from __future__ import annotations

import numpy as np
import pytest

import tailor.ir.activations as activations
from tailor.ir._activation_cache import CACHE, ActivationCache, upstream_keys
from tailor.ir.activations import capture
from tests.helpers import make_model

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,6,6] x) => (float[N,4] y)
  <float[4,3,3,3] w, float[4] b, float[4,4] wf> {
  [conv] c = Conv <pads=[1,1,1,1]> (x, w, b)
  [relu] r = Relu (c)
  [pool] p = GlobalAveragePool (r)
  [flat] f = Flatten (p)
  [fc] y = MatMul (f, wf)
}
"""


@pytest.fixture
def sessions(monkeypatch) -> list[int]:
    """Counts onnxruntime sessions made by capture; starts from an empty cache."""
    CACHE.clear()
    made: list[int] = []
    real = activations.make_session

    def counting(model, **kw):
        made.append(1)
        return real(model, **kw)

    monkeypatch.setattr(activations, "make_session", counting)
    yield made
    CACHE.clear()


def feeds(n: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 3, 6, 6)).astype(np.float32)}


def test_second_capture_is_served_from_the_cache(sessions):
    model = make_model(TEXT)
    first = capture(model, feeds(), ["r", "y"], batch_size=4)
    again = capture(model.copy(), feeds(), ["r", "y"], batch_size=4)
    assert len(sessions) == 1
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert CACHE.hits == 2


def test_a_change_downstream_keeps_upstream_tensors_cached(sessions):
    model = make_model(TEXT)
    before = capture(model, feeds(), ["r", "y"], batch_size=4)
    edited = model.copy()
    edited.tensor("wf").values = edited.tensor("wf").values * 2.0
    after = capture(edited, feeds(), ["r", "y"], batch_size=4)
    assert len(sessions) == 2  # y had to run again
    np.testing.assert_array_equal(before["r"], after["r"])
    np.testing.assert_allclose(after["y"], 2.0 * before["y"], rtol=1e-5, atol=1e-6)
    assert capture(edited, feeds(), ["y"], batch_size=4)["y"].shape == (10, 4)
    assert len(sessions) == 2


@pytest.mark.parametrize(
    ("edit", "conv_changes"),
    [
        (lambda m: setattr(m.tensor("w"), "values", m.tensor("w").values + 1e-3), True),
        (lambda m: setattr(m.tensor("b"), "values", np.array([0, 0, 0, 1e-6], np.float32)), True),
        (lambda m: m.node("conv").attrs.update(pads=[0, 0, 2, 2]), True),
        (lambda m: setattr(m.node("relu"), "op", "Sigmoid"), False),
    ],
    ids=["weight", "one-bias-element", "attribute", "op-downstream-of-conv"],
)
def test_any_upstream_change_misses(edit, conv_changes):
    model = make_model(TEXT)
    edited = model.copy()
    edit(edited)
    before, after = upstream_keys(model, ["c", "r"]), upstream_keys(edited, ["c", "r"])
    assert before["r"] != after["r"]
    assert (before["c"] != after["c"]) is conv_changes


def test_other_data_or_batching_misses(sessions):
    model = make_model(TEXT)
    capture(model, feeds(seed=0), ["r"], batch_size=4)
    other = capture(model, feeds(seed=1), ["r"], batch_size=4)
    capture(model, feeds(seed=0), ["r"], batch_size=5)
    assert len(sessions) == 3
    direct = capture(model, feeds(seed=1), ["r"], batch_size=4)
    np.testing.assert_array_equal(other["r"], direct["r"])


def test_reducers_see_the_same_batches_in_the_same_order(sessions):
    model = make_model(TEXT)
    seen: list[list[tuple[str, float]]] = [[], []]
    for run in seen:

        def reduce(name, batch, run=run):
            run.append((name, float(batch.sum())))
            return batch[:1]

        capture(model, feeds(), ["c", "r", "x"], batch_size=3, reduce=reduce)
    assert len(sessions) == 1
    assert seen[0] == seen[1] and len(seen[0]) == 3 * 4


def test_cached_batches_cannot_be_changed_by_a_caller(sessions):
    model = make_model(TEXT)
    capture(model, feeds(), ["r"], batch_size=10)

    def vandal(name, batch):
        batch[...] = 0.0
        return batch

    with pytest.raises(ValueError, match="read-only"):
        capture(model, feeds(), ["r"], batch_size=10, reduce=vandal)
    assert np.abs(capture(model, feeds(), ["r"], batch_size=10)["r"]).sum() > 0


def test_the_cache_drops_the_least_recently_used_beyond_its_limit():
    cache = ActivationCache(limit=4 * 1000)
    arrays = [np.zeros(200, np.float32) for _ in range(6)]  # 800 bytes each
    for i, a in enumerate(arrays):
        cache.put(bytes([i]), [a])
    assert cache.get(bytes([0])) is None
    assert cache.get(bytes([5])) is not None
    cache.put(b"big", [np.zeros(300, np.float32)])  # over a quarter of the limit
    assert cache.get(b"big") is None
    assert ActivationCache(limit=0).enabled is False


def test_subgraphs_upstream_are_not_cached():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2] x, bool c) => (float[2] y) {
      y = If (c) <then_branch = t () => (float[2] o) { o = Identity (x) },
                  else_branch = e () => (float[2] o) { o = Neg (x) }>
    }
    """
    model = make_model(text)
    assert upstream_keys(model, ["y"]) == {"y": None}
