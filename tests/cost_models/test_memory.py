"""Tests for the peak-memory cost model: hand-computed peaks on a chain and on a branch
where two tensors are alive at once, graph outputs kept alive, batches, folded and
unfolded decode subgraphs, and bounds on a real model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tailor.cost_models.memory import peak_memory, tensor_bytes
from tailor.cost_models.storage import constant_bytes
from tailor.errors import DynamicShapeError
from tailor.ir import Constant, Model
from tests.helpers import make_model, run_passes

HEADER = '<ir_version: 8, opset_import: ["" : 13]>'


def values(result) -> tuple[int, int, int]:
    return tuple(
        int(result[k].value)
        for k in ("peak_memory_bytes", "weights_bytes", "activations_peak_bytes")
    )


def test_chain():
    model = make_model(
        f"""{HEADER}
        g (float[N,8] x) => (float[N,4] y) <float[8,16] w, float[16,4] w2> {{
          a = MatMul (x, w)
          b = Relu (a)
          y = MatMul (b, w2)
        }}"""
    )
    # Live bytes while each node runs: x+a = 32+64, a+b = 128, b+y = 64+16.
    weights = 4 * (8 * 16 + 16 * 4)
    result = peak_memory(model)
    assert values(result) == (weights + 128, weights, 128)
    assert all(e.source == "exact" and e.unit == "B" for e in result.values())
    assert "Relu 'Relu_0'" in result["activations_peak_bytes"].note
    assert "Relu 'Relu_0'" in result["peak_memory_bytes"].note
    assert values(peak_memory(model, batch=3)) == (weights + 3 * 128, weights, 3 * 128)


def test_branch_keeps_both_tensors_alive():
    model = make_model(
        f"""{HEADER}
        g (float[1,8] x) => (float[1,16] y) {{
          a = Relu (x)
          b = Neg (x)
          c = Concat <axis=1> (a, b)
          y = Sigmoid (c)
        }}"""
    )
    # Relu: x+a = 64; Neg: x+a+b = 96, then x is freed; Concat: a+b+c = 32+32+64 = 128;
    # Sigmoid: c+y = 128 (a tie: the first peak is named).
    result = peak_memory(model)
    assert values(result) == (128, 0, 128)
    assert "Concat 'Concat_0'" in result["activations_peak_bytes"].note


def test_graph_outputs_stay_alive_and_dead_outputs_are_freed():
    model = make_model(
        f"""{HEADER}
        g (float[1,100] x) => (float[1,100] early, float[1,1] y) {{
          early = Relu (x)
          m, i = TopK <axis=1> (early, k)
          big = Tile (m, reps)
          y = ReduceSum <keepdims=1> (big)
        }}""",
        {"k": np.asarray([1], np.int64), "reps": np.asarray([1, 200], np.int64)},
    )
    # Relu: x+early = 800. TopK: early+m+i = 412, and i (8 bytes, never read) is freed at
    # once. Tile: early (a graph output, kept) + m + big = 400+4+800 = 1204.
    result = peak_memory(model)
    assert values(result) == (1204 + 24, 24, 1204)
    assert "Tile 'Tile_0'" in result["activations_peak_bytes"].note


def test_peak_at_the_inputs():
    model = make_model(
        f"""{HEADER}
        g (float[1,1000] x) => (float[1,1] y) {{ y = ReduceMax <keepdims=1> (x) }}"""
    )
    result = peak_memory(model)
    assert values(result) == (4004, 0, 4004)


def test_dynamic_dims_are_refused():
    model = make_model(
        f"""{HEADER}
        g (float[N,C] x) => (float[N,C] y) {{ y = Relu (x) }}"""
    )
    with pytest.raises(DynamicShapeError, match="dynamic dimension"):
        peak_memory(model)


def test_decode_subgraphs_folded_or_run():
    model = make_model(
        f"""{HEADER}
        g (float[1,1024] x) => (float[1,64] y) <float[1024,64] w> {{ y = MatMul (x, w) }}"""
    )
    floats = peak_memory(model)
    assert values(floats) == (4 * 1024 * 64 + 4096 + 256, 4 * 1024 * 64, 4096 + 256)
    out = run_passes(model, "cluster_weights(clusters=16)")
    folded = peak_memory(out)
    # Folded at load, the codebook decode costs the float weight in memory.
    assert values(folded) == values(floats)
    stored = peak_memory(out, folded=False)
    assert stored["weights_bytes"].value == constant_bytes(out).value < 0.2 * 4 * 1024 * 64
    # Run at every inference, the int32 index planes and the decoded weight are activations.
    decoded = out.producer(out.node("MatMul_0").inputs[1])
    assert decoded.op == "Gather"
    assert stored["activations_peak_bytes"].value >= 4096 + 2 * 4 * 1024 * 64
    assert "run every inference" in stored["peak_memory_bytes"].note


def test_tensor_bytes():
    model = make_model(
        f"""{HEADER}
        g (float[N,3,4] x) => (int64[3] s) {{ s = Shape (x) }}"""
    )
    assert tensor_bytes(model, model.inputs[0], batch=5) == 5 * 3 * 4 * 4


def test_real_model_bounds(arch_path):
    model = run_passes(Model.load(arch_path("resnet18")), "fuse")
    result = peak_memory(model)
    weights, acts = result["weights_bytes"].value, result["activations_peak_bytes"].value
    assert weights == constant_bytes(model).value
    assert result["peak_memory_bytes"].value == weights + acts
    sizes = {
        t.name: math.prod(model.static_shape(t)) * 4
        for n in model.nodes
        for t in (*n.inputs, *n.outputs)
        if not isinstance(t, Constant)
    }
    # At least what any one node reads and writes; at most every activation at once.
    widest = max(
        sum(sizes[name] for name in {t.name for t in (*n.inputs, *n.outputs)} if name in sizes)
        for n in model.nodes
    )
    assert widest <= acts < sum(sizes.values())
    assert peak_memory(model, batch=2)["activations_peak_bytes"].value == 2 * acts
