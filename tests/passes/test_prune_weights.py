"""Tests for prune_weights: magnitude masks per layer and global, the bit-mask encoding
(structure, exact decode, bytes), the dense fallback, and where it must not apply.

Exactness of the decode: the rewritten model must match, to 1e-6, the original model with
each weight replaced by its numpy-pruned copy, so a wrong bit order, rank or shape in the
ONNX decode subgraph shows.
"""

from __future__ import annotations

import numpy as np
import pytest

from tailor.ir import Model, compare
from tailor.ir.layers import layer_weight
from tailor.passes import PassContext
from tailor.passes.prune_weights import PruneWeights, magnitude_masks
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types, run_passes

# The Conv weight has 30*3*3*3 = 810 elements: not a multiple of 8, so the bit mask is
# padded and the decoder must cut it.
MODEL = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[N,3,8,8] x) => (float[N,5] y) <float[30,3,3,3] w, float[30] b, float[5,1920] w2, float[5] b2, float[1920,5] w3> {{
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


def prune(model: Model, data=None, **config):
    return PruneWeights(**config).run(model.copy(), PassContext(calibration=data))


def pruned_reference(model: Model, sparsity: float, scope: str = "layer") -> Model:
    """The model with its weights zeroed by the numpy masks, stored densely."""
    ref = model.copy()
    nodes = [n for n in ref.nodes if layer_weight(ref, n) is not None]
    found = [layer_weight(ref, n) for n in nodes]
    masks = magnitude_masks([w for _, w in found], sparsity, scope)
    for node, (index, w), keep in zip(nodes, found, masks, strict=True):
        node.inputs[index] = ref.add_constant("ref", np.where(keep, w, 0).astype(w.dtype))
    return ref


def test_bitmask_structure_bytes_and_exact_decode():
    model = make_model(MODEL.format(opset=13))
    result = prune(model, sparsity=0.75)
    out = result.model
    assert result.modified
    ops = op_types(out)
    assert ops.count("CumSum") == 3 and ops.count("Gather") == 3
    assert ops.count("Slice") == 1  # only the Conv's 810 bits need cutting
    for name in LAYERS:
        node = out.node(name)
        assert out.producer(node.inputs[1]).op == "Reshape"
        note = result.layer_notes[name]
        assert note["encoding"] == "bitmask"
        size = note["bytes_before"] // 4
        kept = size - int(np.floor(0.75 * size))
        assert note["sparsity"] == pytest.approx(1 - kept / size)
        # mask bits + kept values + the leading zero (+ small shared constants), + nodes
        data = note["bytes_after"] - note["graph_bytes"]
        assert (size + 7) // 8 + 4 * (kept + 1) <= data <= (size + 7) // 8 + 4 * (kept + 1) + 256
        assert 0 < note["graph_bytes"] < 1000
        assert note["bytes_after"] < note["bytes_before"] * (0.6 if size > 1000 else 1.0)
    assert [t.name for t in out.outputs] == ["y"]
    assert "storage" in result.changes[-1] and "not latency" in result.changes[-1]
    assert_equivalent(pruned_reference(model, 0.75), out, rtol=1e-6)
    assert_valid(out)


def test_global_scope_prunes_by_one_threshold():
    model = make_model(MODEL.format(opset=13))
    # Make the Gemm's weights small: a global threshold must prune it hardest.
    gemm = model.node("Gemm_0")
    gemm.inputs[1] = model.add_constant("w2_small", layer_weight(model, gemm)[1] * 0.1)
    result = prune(model, sparsity=0.5, scope="global")
    notes = result.layer_notes
    assert notes["Gemm_0"]["sparsity"] > 0.9 > 0.5 > notes["MatMul_0"]["sparsity"]
    total = sum(notes[n]["bytes_before"] // 4 for n in LAYERS)
    zeros = sum(round(notes[n]["sparsity"] * notes[n]["bytes_before"] / 4) for n in LAYERS)
    assert zeros == int(np.floor(0.5 * total))
    assert_equivalent(pruned_reference(model, 0.5, "global"), result.model, rtol=1e-6)
    assert_valid(result.model)


def test_magnitude_masks_keep_the_largest():
    w = np.array([[0.1, -3.0, 0.2], [2.0, -0.05, 1.0]], np.float32)
    (keep,) = magnitude_masks([w], 0.5, "layer")
    assert keep.tolist() == [[False, True, False], [True, False, True]]
    a, b = magnitude_masks([w, w * 100], 0.5, "global")
    assert not a.any() and b.all()


def test_ratio_zero_changes_nothing():
    model = make_model(MODEL.format(opset=13))
    result = prune(model, sparsity=0.0)
    assert not result.modified and result.changes == []
    assert op_types(result.model) == op_types(model)
    assert "zeros none" in result.layer_notes["Conv_0"]["skipped"]
    assert_equivalent(model, result.model)


def test_dense_encoding_and_fallbacks():
    model = make_model(MODEL.format(opset=13))
    dense = prune(model, CALIBRATION, sparsity=0.5, encoding="dense")
    assert op_types(dense.model) == op_types(model)
    note = dense.layer_notes["Gemm_0"]
    assert note["encoding"] == "dense" and note["bytes_after"] == note["bytes_before"]
    assert note["zlib_bytes_after"] < 0.75 * note["zlib_bytes_before"]
    assert 0 < note["rel_error"] < 1  # measured on the calibration data
    assert "output rel. error" in dense.changes[0]
    # Almost dense: a bit mask would not be smaller.
    light = prune(model, sparsity=0.01)
    assert "CumSum" not in op_types(light.model)
    assert "not fewer than" in light.layer_notes["Gemm_0"]["dense_because"]
    # Opset 10 has no CumSum.
    old = make_model(MODEL.format(opset=10))
    result = prune(old, sparsity=0.5)
    assert "opset >= 11" in result.layer_notes["Conv_0"]["dense_because"]
    assert_equivalent(pruned_reference(old, 0.5), result.model, rtol=1e-6)
    assert_valid(result.model)


def test_excluded_layer_is_untouched():
    model = make_model(MODEL.format(opset=13))
    result = prune(model, sparsity=0.5, layers="!MatMul_0")
    out = result.model
    assert np.array_equal(
        out.constant_value(out.node("MatMul_0").inputs[1]),
        model.constant_value(model.node("MatMul_0").inputs[1]),
    )
    assert "MatMul_0" not in result.layer_notes
    assert out.producer(out.node("Gemm_0").inputs[1]).op == "Reshape"
    assert_valid(out)


def test_pipeline_then_quantize_weights_keeps_zeros():
    """Deep-compression order: prune densely, then quantize; zeros stay zeros."""
    model = make_model(MODEL.format(opset=13))
    out = run_passes(model, "prune_weights(sparsity=0.5,encoding=dense),quantize_weights")
    # The int8 codes sit upstream of the weight input, whatever decodes them.
    stack, codes = [out.node("MatMul_0").inputs[1]], None
    while stack and codes is None:
        t = stack.pop()
        value = out.constant_value(t)
        if value is not None and value.dtype == np.int8:
            codes = value
        elif out.producer(t) is not None:
            stack.extend(out.producer(t).inputs)
    assert codes is not None and np.mean(codes == 0) >= 0.5
    assert compare(pruned_reference(model, 0.5), out).max_rel < 2e-2


@pytest.mark.parametrize("name", ["resnet18", "densenet"])
def test_architectures(arch_path, name):
    model = Model.load(arch_path(name))
    fused = run_passes(model, "fuse")
    result = PruneWeights(sparsity=0.75).run(fused.copy(), PassContext())
    out = result.model
    assert_valid(out)
    assert [t.name for t in out.outputs] == ["logits"]
    assert "CumSum" in op_types(out)
    # The layers of these tiny models are a few hundred weights: those where the decode
    # nodes would cost more than they save stay dense, and the model never grows.
    assert out.to_proto().ByteSize() < fused.to_proto().ByteSize()
    assert compare(fused, out).max_rel < 1.0
