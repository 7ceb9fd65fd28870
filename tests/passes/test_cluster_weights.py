"""Tests for cluster_weights: k-means codebooks per layer and shared, 4-bit and 8-bit
indices decoded by Gather, exactness when a weight has no more distinct values than
clusters, bytes saved, errors reported, and where it must not apply.
"""

from __future__ import annotations

import numpy as np
import pytest

from tailor.ir import Model, compare
from tailor.ir.layers import layer_weight
from tailor.passes import PassContext
from tailor.passes.cluster_weights import ClusterWeights, assign, kmeans_1d
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types, run_passes

MODEL = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[N,3,8,8] x) => (float[N,5] y) <float[32,3,3,3] w, float[32] b, float[5,2048] w2, float[5] b2, float[2048,5] w3> {{
  c = Conv <pads=[1,1,1,1]> (x, w, b)
  r = Relu (c)
  f = Flatten (r)
  y0 = Gemm <transB=1> (f, w2, b2)
  f2 = MatMul (f, w3)
  y = Add (y0, f2)
}}
"""
LAYERS = ("Conv_0", "Gemm_0", "MatMul_0")
CALIBRATION = {"x": np.random.default_rng(5).standard_normal((16, 3, 8, 8)).astype(np.float32)}


def cluster(model: Model, data=None, **config):
    return ClusterWeights(**config).run(model.copy(), PassContext(calibration=data))


def few_values(model: Model, count: int) -> Model:
    """The model with every layer weight drawn from `count` distinct values."""
    out = model.copy()
    rng = np.random.default_rng(3)
    values = rng.standard_normal(count).astype(np.float32)
    for node in out.nodes:
        found = layer_weight(out, node)
        if found is not None:
            index, w = found
            node.inputs[index] = out.add_constant("few", rng.choice(values, size=w.shape))
    return out


@pytest.mark.parametrize(("clusters", "bits"), [(16, 4), (64, 8)])
def test_exact_when_clusters_cover_the_distinct_values(clusters, bits):
    model = few_values(make_model(MODEL.format(opset=13)), clusters)
    result = cluster(model, clusters=clusters)
    out = result.model
    ops = op_types(out)
    assert ops.count("Gather") == 3
    assert ("Mod" in ops) == (bits == 4)  # 4-bit indices are unpacked
    for name in LAYERS:
        note = result.layer_notes[name]
        assert note["index_bits"] == bits and note["clusters"] <= clusters
        assert note["weight_rel_error"] == 0.0
        assert out.producer(out.node(name).inputs[1]).op == "Gather"
    gemm = result.layer_notes["Gemm_0"]
    # indices, plus the codebook (unless an identical one was stored already) and shapes
    indices = 10240 * bits // 8
    assert indices <= gemm["bytes_after"] - gemm["graph_bytes"] <= indices + 4 * clusters + 32
    # The decoded tensors keep the weights' names; the outputs keep theirs.
    assert out.node("Gemm_0").inputs[1].name == model.node("Gemm_0").inputs[1].name
    assert [t.name for t in out.outputs] == ["y"]
    assert "not latency" in result.changes[-1]
    assert_equivalent(model, out, rtol=1e-6)
    assert_valid(out)


@pytest.mark.parametrize("opset", [9, 13])
def test_lossy_clustering_reports_errors(opset):
    model = make_model(MODEL.format(opset=opset))
    coarse = cluster(model, CALIBRATION, clusters=8)
    fine = cluster(model, CALIBRATION, clusters=256)
    for name in LAYERS:
        a, b = coarse.layer_notes[name], fine.layer_notes[name]
        assert 0 < b["rel_error"] < a["rel_error"] < 0.5
        assert 0 < b["weight_rel_error"] < a["weight_rel_error"]
    assert "output rel. error" in coarse.changes[0]
    assert compare(model, fine.model).max_rel < 5e-2
    assert_valid(coarse.model)
    assert_valid(fine.model)


def test_shared_codebook():
    model = make_model(MODEL.format(opset=13))
    result = cluster(model, clusters=16, per_layer=False)
    out = result.model
    books = {out.node(n).inputs[1].inputs[0].inputs[0].name for n in LAYERS}
    assert len(books) == 1  # one codebook initializer read by every Gather
    notes = result.layer_notes
    assert all(n["codebook"] == "shared" for n in notes.values())
    # Only the first layer (the Conv) pays for the 16-entry codebook; the others store
    # 10,240 indices in 5,120 bytes.
    for name in ("Gemm_0", "MatMul_0"):
        assert 5120 <= notes[name]["bytes_after"] - notes[name]["graph_bytes"] <= 5120 + 32
    conv = notes["Conv_0"]["bytes_after"] - notes["Conv_0"]["graph_bytes"]
    assert 864 // 2 + 16 * 4 <= conv <= 864 // 2 + 16 * 4 + 64
    assert_valid(out)
    assert compare(model, out).max_rel < 0.3


def test_kmeans_finds_clusters_and_is_deterministic():
    rng = np.random.default_rng(0)
    centres = np.array([-2.0, 0.0, 3.0])
    values = np.concatenate([c + 0.01 * rng.standard_normal(500) for c in centres])
    found = kmeans_1d(values, 3)
    assert np.allclose(found, centres, atol=0.01)
    assert np.array_equal(found, kmeans_1d(values, 3))
    assert assign(np.array([-1.5, 0.2, 2.0]), found).tolist() == [0, 1, 2]
    assert kmeans_1d(np.array([1.0, 1.0, 2.0]), 8).tolist() == [1.0, 2.0]


def test_excluded_and_too_small_layers_are_left_alone():
    model = make_model(MODEL.format(opset=13))
    result = cluster(model, clusters=256, layers="!Gemm_0")
    out = result.model
    assert out.constant_value(out.node("Gemm_0").inputs[1]) is not None
    assert "Gemm_0" not in result.layer_notes
    # 12 weights (48 bytes): indices, codebook and decode nodes cannot be smaller.
    tiny = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,4,4] x) => (float[N,4,4,4] y) <float[4,3,1,1] w> {
          y = Conv (x, w)
        }
        """
    )
    result = cluster(tiny, clusters=4)
    assert not result.modified
    assert op_types(result.model) == ["Conv"]
    assert "not fewer than 48" in result.layer_notes["Conv_0"]["skipped"]


def test_pipeline_text_and_architecture(arch_path):
    model = Model.load(arch_path("vgg"))
    out = run_passes(model, "fuse,cluster_weights(clusters=32)")
    assert_valid(out)
    assert [t.name for t in out.outputs] == ["logits"]
    assert "Gather" in op_types(out)
    assert compare(model, out).max_rel < 0.1
