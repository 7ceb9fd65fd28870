"""Tests for the storage cost model: exact file bytes (inline and external data), bytes
per layer for float weights, shared weights and Constant nodes, and the encodings of the
storage passes and of quantize attributed to the layers they decode into."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tailor.cost_models.storage import constant_bytes, layer_storage, model_storage
from tailor.errors import ModelLoadError
from tailor.ir import Model
from tests.helpers import make_model, run_passes

HEADER = '<ir_version: 8, opset_import: ["" : 13]>'
MODEL = f"""
{HEADER}
g (float[N,8,10,10] x) => (float[N,5] y)
  <float[16,8,3,3] w, float[16] b, float[5,1600] w2, float[5] b2, float[1600,5] w3> {{
  c = Conv <pads=[1,1,1,1]> (x, w, b)
  r = Relu (c)
  f = Flatten (r)
  y0 = Gemm <transB=1> (f, w2, b2)
  f2 = MatMul (f, w3)
  y = Add (y0, f2)
}}
"""
FLOAT_BYTES = {"Conv_0": 4 * (16 * 8 * 9 + 16), "Gemm_0": 4 * (5 * 1600 + 5), "MatMul_0": 4 * 8000}
CALIBRATION = {"x": np.random.default_rng(1).standard_normal((8, 8, 10, 10)).astype(np.float32)}


@pytest.fixture(scope="module")
def model() -> Model:
    return make_model(MODEL)


def values(estimates) -> dict[str, int]:
    return {k: int(v.value) for k, v in estimates.items()}


# ---------------------------------------------------------------- whole model
def test_model_storage_in_memory_and_on_disk(model, tmp_path):
    est = model_storage(model)
    assert (est.value, est.unit, est.source) == (len(model.to_bytes()), "B", "exact")
    path = model.save(tmp_path / "m.onnx")
    assert model_storage(path).value == path.stat().st_size
    assert model_storage(str(path)).value == path.stat().st_size
    assert model_storage(path.read_bytes()).value == path.stat().st_size
    assert model_storage(model.to_proto()).value == len(model.to_bytes())


@pytest.mark.parametrize("one_file", [True, False])
def test_model_storage_counts_external_data(model, tmp_path, one_file):
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        model.to_proto(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=one_file,
        location="weights.bin" if one_file else None,
        size_threshold=0,
    )
    data = [p for p in tmp_path.iterdir() if p != path]
    assert len(data) == (1 if one_file else 5)  # w, b, w2, b2, w3
    est = model_storage(path)
    assert est.value == path.stat().st_size + sum(p.stat().st_size for p in data)
    assert est.value > path.stat().st_size + 4 * 16000
    assert f"{len(data)} external data file(s)" in est.note
    # Loaded, the weights are inline: the in-memory figure is the serialization.
    assert model_storage(Model.load(path)).value == len(Model.load(path).to_bytes())
    # The proto alone cannot see its data files, and says so.
    assert "not included" in model_storage(onnx.load(str(path), load_external_data=False)).note
    data[0].unlink()
    with pytest.raises(ModelLoadError, match="external data file .* is missing"):
        model_storage(path)


def test_model_storage_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        model_storage(tmp_path / "none.onnx")


# ---------------------------------------------------------------- per layer
def test_float_layers(model):
    assert values(layer_storage(model)) == FLOAT_BYTES
    assert constant_bytes(model).value == sum(FLOAT_BYTES.values())
    assert all(e.source == "exact" and e.unit == "B" for e in layer_storage(model).values())


def test_shared_weight_counted_once_and_constant_nodes():
    model = make_model(
        f"""{HEADER}
        g (float[1,16] x) => (float[1,16] y) <float[16,16] w> {{
          a = MatMul (x, w)
          k = Constant <value = float[16,4] {{{",".join(["0.5"] * 64)}}}> ()
          h = MatMul (a, k)
          back = Constant <value = float[4,16] {{{",".join(["0.25"] * 64)}}}> ()
          z = MatMul (h, back)
          y = MatMul (z, w)
        }}"""
    )
    got = layer_storage(model)
    assert values(got) == {"MatMul_0": 1024, "MatMul_1": 256, "MatMul_2": 256, "MatMul_3": 0}
    assert "1,024 bytes shared" in got["MatMul_3"].note
    assert constant_bytes(model).value == 1024 + 2 * 256


def test_quantize_weights_int8_hand_computed(model):
    out = run_passes(model, "quantize_weights(bits=8)")
    got = values(layer_storage(out))
    # int8 codes + one float32 scale per output channel; the float bias stays.
    assert got == {
        "Conv_0": 16 * 8 * 9 + 4 * 16 + 4 * 16,
        "Gemm_0": 8000 + 4 * 5 + 4 * 5,
        "MatMul_0": 8000 + 4 * 5,
    }
    # Decoded by DequantizeLinear or by Cast/Mul, depending on the pass's `decode`.
    note = layer_storage(out)["Conv_0"].note
    assert "decoded by" in note and ("DequantizeLinear" in note or "Cast" in note)
    assert "int8" in note
    assert model_storage(out).value < 0.3 * model_storage(model).value


@pytest.mark.parametrize(
    "pipeline",
    [
        "quantize_weights(bits=4)",
        "cluster_weights(clusters=16)",
        "prune_weights(sparsity=0.75)",
        "prune_weights(sparsity=0.5,encoding=dense),quantize_weights",
        "quantize(mode=dynamic)",
        "quantize",
    ],
)
def test_encodings_shrink_every_layer(model, pipeline):
    out = run_passes(model, pipeline, calibration=CALIBRATION)
    got = values(layer_storage(out))
    got = {k.removesuffix("_quant").removesuffix("_MatMul"): v for k, v in got.items()}
    assert set(got) == set(FLOAT_BYTES)
    for name, before in FLOAT_BYTES.items():
        assert 0 < got[name] < before, name
    # Every stored byte a layer reads is counted once; what is left is small (shape
    # constants, activation scales of QDQ).
    total = constant_bytes(out).value
    assert sum(got.values()) <= total <= sum(got.values()) + 200
    assert model_storage(out).value < model_storage(model).value


def test_dynamic_quantization_layer_reads_its_scale_and_bias(model):
    out = run_passes(model, "quantize(mode=dynamic)")
    got = layer_storage(out)
    # int8 weight [1600, 5], per-channel int8 zero points and float scales, float bias.
    assert got["MatMul_0_quant"].value == 8000 + 5 + 4 * 5
    assert got["Gemm_0_MatMul_quant"].value == 8000 + 5 + 4 * 5 + 4 * 5
    assert sum(e.value for e in got.values()) == constant_bytes(out).value


def test_architecture_totals(arch_path):
    path = arch_path("resnet18")
    raw = Model.load(path)
    assert model_storage(path).value == path.stat().st_size
    fused = run_passes(raw, "fuse")
    per_layer = layer_storage(fused)
    # Fused, every constant belongs to a Conv or the Gemm.
    assert sum(e.value for e in per_layer.values()) == constant_bytes(fused).value
    out = run_passes(fused, "quantize_weights")
    after = layer_storage(out)
    assert set(after) == set(per_layer)
    assert sum(e.value for e in after.values()) < 0.5 * sum(e.value for e in per_layer.values())
