"""Tests for the latency cost model: kernel grouping on tiny graphs (what onnxruntime runs
fused), hand-computed roofline numbers, a real onnxruntime measurement (sanity only, no
timing assertions), the learned predictor's JSON round trip and source selection, and
the tvm-tuned source with an empty database."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tailor.cost_models.latency import (
    FEATURE_NAMES,
    Kernel,
    LatencyPredictor,
    LatencySample,
    MissingTuningError,
    estimate_latency,
    features,
    kernels,
    predictor_path,
)
from tailor.cost_models.latency_measure import (
    KernelProfile,
    annotate,
    corrected,
    profiler_overhead,
)
from tailor.errors import TailorError, TargetError
from tailor.targets import Target
from tests.helpers import make_model

HEADER = '<ir_version: 8, opset_import: ["" : 13]>'

CONV_RELU = f"""
{HEADER}
g (float[N,8,10,10] x) => (float[N,16,10,10] y) <float[16,8,3,3] w, float[16] b> {{
  c = Conv <pads=[1,1,1,1]> (x, w, b)
  y = Relu (c)
}}
"""

# A basic block with a projection shortcut (first, as torch exports it): the Add (and the
# Relu after it) goes to the conv that runs last, as onnxruntime's fused conv can only add
# a sum that already exists.
RESIDUAL = f"""
{HEADER}
g (float[1,8,6,6] x) => (float[1,8,6,6] y)
  <float[8,8,3,3] w1, float[8,8,3,3] w2, float[8,8,1,1] ws, float[8] s, float[8] bb,
   float[8] m, float[8] v> {{
  p = Conv (x, ws)
  a = Conv <pads=[1,1,1,1]> (x, w1)
  r = Relu (a)
  c = Conv <pads=[1,1,1,1]> (r, w2)
  n = BatchNormalization (c, s, bb, m, v)
  t = Add (p, n)
  y = Relu (t)
}}
"""

POOL = f"""
{HEADER}
g (float[1,4,8,8] x) => (float[1,4,4,4] y) <float[4,4,1,1] w, int64[2] shape> {{
  c = Conv (x, w)
  k = Relu (c)
  y = MaxPool <kernel_shape=[2,2], strides=[2,2]> (k)
}}
"""

QDQ = f"""
{HEADER}
g (float[1,4,6,6] x) => (float[1,8,6,6] y)
  <float xs = {{0.05}}, int8 xz = {{0}}, int8[8,4,3,3] wq, float[8] ws, int8[8] wz,
   float ys = {{0.1}}, int8 yz = {{0}}> {{
  q = QuantizeLinear (x, xs, xz)
  d = DequantizeLinear (q, xs, xz)
  w = DequantizeLinear <axis=0> (wq, ws, wz)
  c = Conv <pads=[1,1,1,1]> (d, w)
  r = Relu (c)
  qy = QuantizeLinear (r, ys, yz)
  y = DequantizeLinear (qy, ys, yz)
}}
"""


def toy_target(**overrides) -> Target:
    fields = {
        "name": "toy",
        "description": "a made-up CPU for hand-computed rooflines",
        "tvm_target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
        "cores": 1,
        "peak_gflops": {"float32": 1.0, "int8": 4.0},
        "mem_bandwidth_gbs": 1.0,
        "memory_mb": 64,
        "storage_mb": 64,
        "power_idle_w": 1.0,
        "power_active_w": 2.0,
    }
    return Target(**(fields | overrides))


def by_op(found: list[Kernel]) -> dict[str, Kernel]:
    return {k.op: k for k in found}


# ------------------------------------------------------------------------ kernels
def test_conv_relu_is_one_kernel():
    [k] = kernels(make_model(CONV_RELU))
    assert (k.op, k.kind, k.dtype) == ("Conv", "conv", "float32")
    assert k.nodes == ["Conv_0", "Relu_0"] and k.fused == ["Relu"]
    assert (k.cin, k.cout, k.kernel_size, k.groups) == (8, 16, [3, 3], 1)
    assert k.macs == 16 * 8 * 9 * 10 * 10
    assert k.gemm == [100, 72, 16]
    assert k.weight_bytes == (16 * 8 * 9 + 16) * 4
    assert k.activation_bytes == (8 + 16) * 100 * 4
    assert k.input_shapes == [[1, 8, 10, 10]] and k.output_shapes == [[1, 16, 10, 10]]


def test_residual_add_goes_to_the_later_conv():
    found = kernels(make_model(RESIDUAL))
    assert [k.nodes for k in found] == [
        ["Conv_0"],
        ["Conv_1", "Relu_0"],
        ["Conv_2", "BatchNormalization_0", "Add_0", "Relu_1"],
    ]
    assert found[2].fused == ["BatchNormalization", "Add:residual", "Relu"]
    # The residual operand is an input of the fused kernel: two activations in, one out.
    assert found[2].input_shapes == [[1, 8, 6, 6], [1, 8, 6, 6]]
    assert all(k.kind == "conv" for k in found)


def test_maxpool_is_its_own_kernel():
    conv, pool = kernels(make_model(POOL))
    assert conv.nodes == ["Conv_0", "Relu_0"]
    assert (pool.op, pool.kind, pool.nodes) == ("MaxPool", "pool", ["MaxPool_0"])
    assert pool.kernel_size == [2, 2] and pool.strides == [2, 2]
    assert pool.macs == 4 * 4 * 4 * 4  # 64 outputs, 4 taps each


def test_qdq_conv_is_one_int8_kernel():
    found = kernels(make_model(QDQ))
    assert [k.op for k in found] == ["QuantizeLinear", "Conv", "DequantizeLinear"]
    conv = found[1]
    assert conv.dtype == "int8" and conv.kind == "conv"
    assert set(conv.nodes) == {
        "Conv_0",
        "DequantizeLinear_0",
        "DequantizeLinear_1",
        "Relu_0",
        "QuantizeLinear_1",
    }
    assert conv.nodes[0] == "Conv_0"
    assert conv.qdq_fanout == 1 and conv.activation_dtype == "int8"
    # int8 weight, its scales and zero points, and the input's and output's scale and zero
    assert conv.weight_bytes == 8 * 4 * 9 + 8 * 4 + 8 + 2 * (4 + 1)
    assert found[0].kind == found[2].kind == "quantize"


def test_constant_subgraphs_are_folded_away():
    model = make_model(
        f"""
        {HEADER}
        g (float[1,4] x) => (float[1,3] y) <float[3,4] w, float[3] b> {{
          wt = Transpose (w)
          two = Constant <value = float {{2.0}}> ()
          w2 = Mul (wt, two)
          m = MatMul (x, w2)
          y = Add (m, b)
        }}
        """
    )
    [k] = kernels(model)
    assert k.nodes == ["MatMul_0", "Add_0"] and k.kind == "gemm"
    assert k.gemm == [1, 4, 3] and k.macs == 12


def test_features_are_finite_and_named():
    for k in kernels(make_model(RESIDUAL)) + kernels(make_model(QDQ)):
        vector = features(k)
        assert len(vector) == len(FEATURE_NAMES) and np.isfinite(vector).all()
    conv = kernels(make_model(CONV_RELU))[0]
    named = dict(zip(FEATURE_NAMES, features(conv), strict=True))
    assert named["kind_conv"] == 1 and named["fused_act"] == 1 and named["cout_mod8"] == 1
    assert named["macs"] == conv.macs and named["gemm_k"] == 72


# ------------------------------------------------------------------------ roofline
def test_roofline_compute_bound_by_hand():
    layers, total = estimate_latency(make_model(CONV_RELU), toy_target(), source="roofline")
    # 2 x 115,200 FLOPs at 1 GFLOP/s = 230.4 us (the 14,272 bytes at 1 GB/s take 14.3 us),
    # plus 1 us per kernel.
    assert total.source == "roofline" and total.unit == "ms"
    assert total.value == pytest.approx(0.2314)
    assert [layer.name for layer in layers] == ["Conv_0"]
    assert layers[0].metrics["latency_ms"].value == pytest.approx(0.2314)
    assert layers[0].metrics["latency_ms"].source == "roofline"


def test_roofline_memory_bound_and_int8_by_hand():
    fast = toy_target(peak_gflops={"float32": 1000.0})
    _, total = estimate_latency(make_model(CONV_RELU), fast, source="roofline")
    # (4,672 weight + 3,200 input + 6,400 output bytes) at 1 GB/s = 14.272 us, + 1 us.
    assert total.value == pytest.approx(0.015272)
    layers, _ = estimate_latency(make_model(QDQ), toy_target(), source="roofline")
    conv = next(layer for layer in layers if layer.op == "Conv")
    # 2 x 8 x 4 x 9 x 36 = 20,736 int8 ops at 4 GOP/s = 5.184 us, + 1 us.
    assert conv.metrics["latency_ms"].value == pytest.approx(0.006184)


# ------------------------------------------------------------------------ measured
def test_measured_on_this_machine_is_labelled_and_adds_up():
    layers, total = estimate_latency(make_model(POOL), "host", source="measured", runs=20)
    assert total.source == "measured" and total.value > 0
    assert [layer.op for layer in layers] == ["Conv", "MaxPool"]
    values = [layer.metrics["latency_ms"].value for layer in layers]
    assert all(v > 0 for v in values)
    assert all(layer.metrics["latency_ms"].source == "measured" for layer in layers)
    assert sum(values) <= total.value * 1.5


def test_the_search_times_candidates_beside_a_reference():
    from tailor.costing import cost_function

    model = make_model(POOL)
    costs = cost_function("host")
    alone = costs(model)["latency"]
    # The reference stands for the baseline, whose latency the search measured: a
    # candidate's figure is that latency times its ratio to the reference, timed beside it.
    costs.set_reference(model, 1000.0)
    same = costs(model)["latency"]
    assert costs.sources["latency"] == "measured"
    assert 500.0 < same < 2000.0
    assert alone < 100.0  # not a ratio: the model's own time
    costs = cost_function("rpi4")  # not this machine: predicted, no reference kept
    costs.set_reference(model, 1000.0)
    assert costs(model)["latency"] < 100.0


def test_annotate_records_what_onnxruntime_runs():
    conv, pool = annotate(make_model(POOL))
    assert any("Conv" in op for op in conv.runtime_ops)
    assert any("MaxPool" in op for op in pool.runtime_ops)
    named = dict(zip(FEATURE_NAMES, features(conv), strict=True))
    assert named["rt_nodes"] == len(conv.runtime_ops) >= 1


def test_profiler_cost_is_taken_out_per_node():
    k = Kernel(name="a", op="Conv", kind="conv", nodes=["a"])
    profile = KernelProfile([k, k, k], [50.0, 10.0, 4.0], 2.0, 70.0, 10, [1.0, 3.0, 1.0])
    # 66 us profiled against 51 measured: 15 us over 5 nodes, 3 us each.
    assert corrected(profile, 51.0) == pytest.approx([47.0, 1.0, 1.0])
    # A given per-node cost; the floor is a tenth of the profiled time.
    assert corrected(profile, 51.0, per_node_us=4.0) == pytest.approx([46.0, 1.0, 0.4])
    # Two models, 2 us per node and 10 % in proportion: the fit recovers both.
    small = KernelProfile([k], [0.0], 0.0, 0.0, 1, [10.0])
    large = KernelProfile([k], [0.0], 0.0, 0.0, 1, [5.0])
    small.kernel_us = [100 * 1.1 + 2 * 10]
    large.kernel_us = [1000 * 1.1 + 2 * 5]
    assert profiler_overhead([small, large], [100.0, 1000.0]) == pytest.approx(2.0)


def test_measured_refuses_a_device_this_machine_is_not():
    with pytest.raises(TargetError, match="onnxruntime measures this machine"):
        estimate_latency(make_model(POOL), toy_target(), source="measured")


# ------------------------------------------------------------------------ learned
def synthetic_samples(count: int = 24, seed: int = 0) -> list[LatencySample]:
    """Models of 1-6 convs whose 'measured' time is 2 us + 1 us per 100k MACs."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        ks = []
        for j in range(int(rng.integers(1, 7))):
            cin, cout = (int(v) for v in rng.choice([8, 16, 32, 64], size=2))
            hw = int(rng.choice([8, 16, 32]))
            macs = cin * cout * 9 * hw * hw
            ks.append(
                Kernel(
                    name=f"conv{j}",
                    op="Conv",
                    kind="conv",
                    nodes=[f"conv{j}"],
                    input_shapes=[[1, cin, hw, hw]],
                    output_shapes=[[1, cout, hw, hw]],
                    cin=cin,
                    cout=cout,
                    kernel_size=[3, 3],
                    gemm=[hw * hw, cin * 9, cout],
                    macs=macs,
                )
            )
        us = [2.0 + k.macs / 1e5 for k in ks]
        samples.append(LatencySample(f"m{i}", ks, us, (sum(us) + 10.0) / 1e3))
    return samples


@pytest.fixture(scope="module")
def predictor() -> LatencyPredictor:
    return LatencyPredictor.fit(synthetic_samples(), meta={"source": "synthetic"})


def test_predictor_learns_and_survives_a_json_round_trip(predictor, tmp_path):
    samples = synthetic_samples(6, seed=1)
    before = predictor.predict([s.kernels for s in samples])
    for s, p in zip(samples, before, strict=True):
        assert p.total_ms == pytest.approx(sum(p.kernel_ms) + p.overhead_ms)
        assert p.total_ms == pytest.approx(s.total_ms, rel=0.35)  # it learned something
    path = predictor.save(tmp_path / "p" / "predictor.json")
    data = json.loads(path.read_text())
    assert data["format"] == "tailor-latency-predictor/1" and data["features"] == list(
        FEATURE_NAMES
    )
    assert "learner" in data["booster"]  # XGBoost's own JSON, not a pickle
    loaded = LatencyPredictor.load(path)
    after = loaded.predict([s.kernels for s in samples])
    assert [p.total_ms for p in after] == pytest.approx([p.total_ms for p in before], rel=1e-9)
    assert loaded.meta["source"] == "synthetic" and loaded.scale == predictor.scale


def test_predictor_refuses_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(TailorError, match="not a tailor latency predictor"):
        LatencyPredictor.load(tmp_path / "x.json")
    with pytest.raises(TailorError, match="cannot read"):
        LatencyPredictor.load(tmp_path / "missing.json")
    with pytest.raises(TailorError, match="no sample has per-kernel times"):
        LatencyPredictor.fit([LatencySample("m", [], None, 1.0)])


def test_auto_uses_a_cached_predictor_else_the_roofline(predictor, tmp_path):
    model = make_model(POOL)
    _, total = estimate_latency(model, "host", cache_dir=tmp_path)
    assert total.source == "roofline"
    predictor.save(predictor_path("host", cache_dir=tmp_path / "latency"))
    layers, total = estimate_latency(model, "host", cache_dir=tmp_path)
    assert total.source == "learned" and "trained on 24 measured models" in total.note
    assert [layer.metrics["latency_ms"].source for layer in layers] == ["learned", "learned"]
    overhead = predictor.overhead_us / 1e3
    assert total.value == pytest.approx(
        sum(layer.metrics["latency_ms"].value for layer in layers) + overhead
    )
    # Another thread count is another predictor: none cached.
    _, other = estimate_latency(model, "host", cache_dir=tmp_path, threads=2)
    assert other.source == "roofline"
    with pytest.raises(TailorError, match="no latency predictor for target 'host' with 2"):
        estimate_latency(model, "host", source="learned", cache_dir=tmp_path, threads=2)


def test_an_outdated_cached_predictor_is_set_aside(tmp_path, caplog):
    path = predictor_path("host", cache_dir=tmp_path / "latency")
    path.parent.mkdir(parents=True)
    path.write_text('{"format": "something else"}')
    _, total = estimate_latency(make_model(POOL), "host", cache_dir=tmp_path)
    assert total.source == "roofline"
    assert "ignoring the cached latency predictor" in caplog.text


# ------------------------------------------------------------------------ tvm-tuned
def test_tvm_tuned_names_the_missing_tasks(tmp_path):
    pytest.importorskip("tvm")
    with pytest.raises(MissingTuningError, match=r"lacks 1 of the model's 1 tasks \(fused_conv2d"):
        estimate_latency(make_model(CONV_RELU), "host", source="tvm-tuned", cache_dir=tmp_path)
