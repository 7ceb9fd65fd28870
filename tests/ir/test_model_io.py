"""Model load/save: sources, round trips, atomic writes, external data, bad input, shapes
and the graph-editing helpers that must keep the model's interface."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import tailor.ir.model as model_module
from tailor.errors import DynamicShapeError, ModelLoadError, UnsupportedModelError
from tailor.ir import Constant, Model
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types

CONV_RELU = """
<ir_version: 8, opset_import: ["" : 15, "ai.onnx.ml" : 3]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[4,3,3,3] w, float[4] b> {
  c = Conv <pads=[1,1,1,1]> (x, w, b)
  y = Relu (c)
}
"""


@pytest.fixture
def conv_relu() -> Model:
    return make_model(CONV_RELU)


def proto_with_meta(model: Model) -> onnx.ModelProto:
    """The model's proto with a producer and metadata, as a trained model would carry."""
    proto = model.to_proto()
    proto.producer_name = "pytorch"
    proto.producer_version = "2.13.0"
    proto.doc_string = "a test model"
    helper.set_model_props(proto, {"author": "tests", "license": "MIT", "note": "x" * 40})
    return proto


def message_is_one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert text and "\n" not in text, text
    return text


def graph_signature(model: Model) -> tuple:
    """What a truncated file must never silently change: nodes, weights, interface."""
    nodes = tuple(
        (n.name, n.op, tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs))
        for n in model.nodes
    )
    weights = tuple(
        sorted(
            (name, np.asarray(t.values).tobytes())
            for name, t in model.tensors().items()
            if isinstance(t, Constant)
        )
    )
    return nodes, weights, tuple(t.name for t in model.inputs), tuple(t.name for t in model.outputs)


# ---------------------------------------------------------------------- sources
def test_load_from_path_bytes_and_proto(tmp_path, conv_relu):
    path = conv_relu.save(tmp_path / "m.onnx")
    from_path = Model.load(path)
    from_str = Model.load(str(path))
    from_bytes = Model.load(path.read_bytes())
    from_proto = Model.load(onnx.load(path))
    for m in (from_path, from_str, from_bytes, from_proto):
        assert op_types(m) == ["Conv", "Relu"]
        assert m.fingerprint() == conv_relu.fingerprint()
    assert from_path.source == str(path)
    assert from_bytes.source == "<bytes>"
    assert from_proto.source == "<ModelProto>"


def test_save_load_round_trip_keeps_model_fields(tmp_path, conv_relu):
    model = Model.load(proto_with_meta(conv_relu))
    back = Model.load(model.save(tmp_path / "sub" / "m.onnx"))
    proto = back.to_proto()
    assert proto.producer_name == "pytorch"
    assert proto.producer_version == "2.13.0"
    assert proto.doc_string == "a test model"
    assert {p.key: p.value for p in proto.metadata_props} == {
        "author": "tests",
        "license": "MIT",
        "note": "x" * 40,
    }
    assert proto.ir_version == 8
    assert {o.domain: o.version for o in proto.opset_import} == {"": 15, "ai.onnx.ml": 3}
    assert back.opset == 15
    assert [n.name for n in back.nodes] == [n.name for n in model.nodes] == ["Conv_0", "Relu_0"]
    assert_equivalent(model, back, rtol=0.0)
    assert_valid(back)


def test_nodes_without_names_get_unique_names():
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),  # no name
        helper.make_node("Relu", ["a"], ["b"], name="act"),
        helper.make_node("Relu", ["b"], ["c"], name="act"),  # duplicate name
        helper.make_node("Relu", ["c"], ["d"]),
        helper.make_node("Relu", ["d"], ["y"], name="Relu_0"),  # taken by the naming scheme
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        [w],
    )
    model = Model.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    names = [n.name for n in model.nodes]
    assert len(set(names)) == len(names) == 5
    assert all(names)
    assert names[1] == "act" and names[4] == "Relu_0"
    assert names[0] == "MatMul_0"


# ---------------------------------------------------------------------- atomic save
def test_failed_save_leaves_no_file_and_no_temp_dir(tmp_path, conv_relu, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", boom)
    dest = tmp_path / "m.onnx"
    with pytest.raises(OSError, match="disk full"):
        conv_relu.save(dest)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("external_data", [False, True])
def test_failed_save_does_not_overwrite(tmp_path, conv_relu, monkeypatch, external_data):
    dest = conv_relu.save(tmp_path / "m.onnx", external_data=external_data)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_save = onnx.save_model

    def half_then_boom(proto, path, *args, **kwargs):
        real_save(proto, path, *args, **kwargs)  # the temporary files exist, then it fails
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", half_then_boom)
    changed = conv_relu.copy()
    changed.nodes[1].op = "Sigmoid"
    with pytest.raises(OSError, match="disk full"):
        changed.save(dest, external_data=external_data)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert op_types(Model.load(dest)) == ["Conv", "Relu"]


# ---------------------------------------------------------------------- external data
def test_external_data_round_trip(tmp_path, conv_relu):
    model = Model.load(proto_with_meta(conv_relu))
    path = model.save(tmp_path / "net.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.data", "net.onnx"]
    stored = onnx.load(path, load_external_data=False)
    assert all(onnx.external_data_helper.uses_external_data(t) for t in stored.graph.initializer), (
        "every weight lives in net.data"
    )
    back = Model.load(path)
    assert back.fingerprint() == model.fingerprint()
    assert {p.key for p in back.to_proto().metadata_props} == {"author", "license", "note"}
    assert_equivalent(model, back, rtol=0.0)


def test_external_data_loads_from_another_working_directory(tmp_path, conv_relu, monkeypatch):
    path = conv_relu.save(tmp_path / "a" / "net.onnx", external_data=True)
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Model.load(path).fingerprint() == conv_relu.fingerprint()
    assert Model.load(os.path.relpath(path)).fingerprint() == conv_relu.fingerprint()


def test_large_model_writes_external_data_automatically(tmp_path, conv_relu, monkeypatch):
    small = conv_relu.save(tmp_path / "small.onnx")
    assert not (tmp_path / "small.data").exists()
    onnx.load(small)  # self-contained
    monkeypatch.setattr(model_module, "_EXTERNAL_DATA_THRESHOLD", 100)
    path = conv_relu.save(tmp_path / "big.onnx")
    assert (tmp_path / "big.data").is_file()
    stored = onnx.load(path, load_external_data=False)
    assert onnx.external_data_helper.uses_external_data(stored.graph.initializer[0])
    assert Model.load(path).fingerprint() == conv_relu.fingerprint()


def rewrite_location(path: Path, location: str, tensor: str = "w") -> None:
    proto = onnx.load(path, load_external_data=False)
    for t in proto.graph.initializer:
        if t.name == tensor:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
    path.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("location", ["../secret", "sub/../../secret", "/etc/passwd", "ABSOLUTE"])
def test_external_data_outside_the_folder_is_refused(tmp_path, conv_relu, location):
    model_dir = tmp_path / "model"
    path = conv_relu.save(model_dir / "net.onnx", external_data=True)
    (tmp_path / "secret").write_bytes(b"\0" * 1024)
    if location == "ABSOLUTE":
        location = str(tmp_path / "secret")
    rewrite_location(path, location)
    with pytest.raises(ModelLoadError) as e:
        Model.load(path)
    text = message_is_one_line(e)
    assert "'w'" in text and location in text


def test_external_data_symlink_out_of_the_folder_is_refused(tmp_path, conv_relu):
    path = conv_relu.save(tmp_path / "model" / "net.onnx", external_data=True)
    data = tmp_path / "model" / "net.data"
    outside = tmp_path / "outside.data"
    data.rename(outside)
    data.symlink_to(outside)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        Model.load(path)


def test_missing_external_file_is_refused(tmp_path, conv_relu):
    path = conv_relu.save(tmp_path / "net.onnx", external_data=True)
    (tmp_path / "net.data").unlink()
    with pytest.raises(ModelLoadError) as e:
        Model.load(path)
    assert "missing" in message_is_one_line(e) and "net.data" in str(e.value)


def test_truncated_external_file_is_refused(tmp_path, conv_relu):
    path = conv_relu.save(tmp_path / "net.onnx", external_data=True)
    data = tmp_path / "net.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelLoadError) as e:
        Model.load(path)
    assert "'w'" in message_is_one_line(e)


def test_bytes_of_a_model_with_external_data_are_refused(tmp_path, conv_relu):
    path = conv_relu.save(tmp_path / "net.onnx", external_data=True)
    with pytest.raises(ModelLoadError, match="from its path"):
        Model.load(path.read_bytes())
    with pytest.raises(ModelLoadError, match="from its path"):
        Model.load(onnx.load(path, load_external_data=False))


# ---------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        Model.load(tmp_path / "nope.onnx")
    assert "does not exist" in message_is_one_line(e)


def test_directory(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        Model.load(tmp_path)
    assert "not a file" in message_is_one_line(e)


def test_empty_file(tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError) as e:
        Model.load(tmp_path / "e.onnx")
    assert "empty" in message_is_one_line(e)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(tmp_path, seed):
    data = np.random.default_rng(seed).bytes(256)
    (tmp_path / "r.onnx").write_bytes(data)
    with pytest.raises(ModelLoadError) as e:
        Model.load(tmp_path / "r.onnx")
    assert "not an ONNX model" in message_is_one_line(e)


def test_text_file(tmp_path):
    (tmp_path / "t.onnx").write_text("ir_version: 8\nthis is not a protobuf\n")
    with pytest.raises(ModelLoadError):
        Model.load(tmp_path / "t.onnx")


def test_every_truncation_is_refused_or_keeps_the_graph(conv_relu):
    """The graph is one length-delimited protobuf field, so a cut inside it never parses.

    A cut after it can only drop trailing model-level fields (an unused opset import,
    metadata entries): the file is then a shorter but valid model whose graph is intact.
    """
    original = Model.load(proto_with_meta(conv_relu))
    data = original.to_bytes()
    graph_end = data.index(b"\x42", len(data) - 200)  # opset_import (field 8) follows the graph
    parsed = []
    for cut in range(1, len(data)):
        try:
            loaded = Model.load(data[:cut])
        except (ModelLoadError, UnsupportedModelError) as e:
            assert "\n" not in str(e)
            continue
        parsed.append(cut)
        assert cut >= graph_end
        assert graph_signature(loaded) == graph_signature(original)
    # Cuts at the boundaries between metadata entries or opset imports.
    assert parsed and len(parsed) < 8


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_truncated_file(tmp_path, conv_relu, fraction):
    data = conv_relu.to_bytes()
    (tmp_path / "t.onnx").write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError) as e:
        Model.load(tmp_path / "t.onnx")
    message_is_one_line(e)


def test_truncated_opsets_are_refused():
    """A cut right after the graph leaves no opset import: not an ONNX model."""
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        [w],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    only_graph = onnx.ModelProto(ir_version=8, graph=proto.graph).SerializeToString()
    with pytest.raises(ModelLoadError, match="no graph or no opset"):
        Model.load(only_graph)


def test_op_from_a_foreign_domain():
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 15, "com.evil" : 1]>
        g (float[1,4] x) => (float[1,4] y) {
          y = com.evil.Exfiltrate (x)
        }
        """
    )
    with pytest.raises(UnsupportedModelError) as e:
        Model.load(proto)
    text = message_is_one_line(e)
    assert "'Exfiltrate'" in text and "'com.evil'" in text


def test_unknown_op_in_the_default_domain():
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[1,4] x) => (float[1,4] y) {
          y = FrobnicateAll (x)
        }
        """
    )
    with pytest.raises(ModelLoadError) as e:
        Model.load(proto)
    assert "FrobnicateAll" in message_is_one_line(e)


def test_node_input_never_produced():
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[1,4] x) => (float[1,4] y) {
          y = Add (x, ghost)
        }
        """
    )
    with pytest.raises(ModelLoadError) as e:
        Model.load(proto)
    assert "ghost" in message_is_one_line(e)


def test_check_false_skips_the_checker_but_not_the_parser():
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[1,4] x) => (float[1,4] y) {
          y = FrobnicateAll (x)
        }
        """
    )
    assert op_types(Model.load(proto, check=False)) == ["FrobnicateAll"]
    with pytest.raises(ModelLoadError):
        Model.load(b"\xff\xff\xff", check=False)


# ---------------------------------------------------------------------- shapes
DYNAMIC = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[N,3,8,8] x) => (float[N,4,4,4] y) <float[4,3,3,3] w> {
  c = Conv <pads=[1,1,1,1], strides=[2,2]> (x, w)
  y = Relu (c)
}
"""


def test_infer_shapes_records_shapes_and_dtypes():
    model = make_model(DYNAMIC)
    c = model.tensor("c")
    assert Model.shape(c) == ["N", 4, 4, 4]
    assert np.dtype(c.dtype) == np.float32
    assert model.static_shape(c) == (1, 4, 4, 4)
    assert model.static_shape(c, batch=8) == (8, 4, 4, 4)
    assert Model.shape(model.tensor("w")) == [4, 3, 3, 3]


def test_set_input_shapes_fixes_a_dynamic_batch():
    model = make_model(DYNAMIC)
    model.set_input_shapes({"x": [2, 3, 8, 8]})
    assert Model.shape(model.inputs[0]) == [2, 3, 8, 8]
    assert Model.shape(model.tensor("c")) == [2, 4, 4, 4]
    assert model.static_shape(model.tensor("c"), batch=5) == (2, 4, 4, 4)


def test_set_input_shapes_errors():
    model = make_model(DYNAMIC)
    with pytest.raises(DynamicShapeError, match="inputs are: x"):
        model.set_input_shapes({"image": [1, 3, 8, 8]})
    with pytest.raises(DynamicShapeError, match="rank 4"):
        model.set_input_shapes({"x": [1, 3, 8]})


def test_static_shape_refuses_a_symbolic_non_batch_dim():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[N,3,H,W] x) => (float[N,4,H,W] y) <float[4,3,1,1] w> {
          y = Conv (x, w)
        }
        """
    )
    with pytest.raises(DynamicShapeError) as e:
        model.static_shape(model.inputs[0])
    text = message_is_one_line(e)
    assert "'H'" in text and "axis 2" in text and "--input-shape" in text
    model.set_input_shapes({"x": [1, 3, 16, 16]})
    assert model.static_shape(model.outputs[0]) == (1, 4, 16, 16)


def test_static_shape_without_inference():
    model = Model.load(
        onnx.parser.parse_model(DYNAMIC.replace("=> (float[N,4,4,4] y)", "=> (y)")), check=False
    )
    with pytest.raises(DynamicShapeError, match="no inferred shape"):
        model.static_shape(model.tensor("c"))


# ---------------------------------------------------------------------- editing helpers
def test_bypass_in_front_of_an_output_keeps_the_output_name():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[N,4] x) => (float[N,4] y) {
          r = Relu (x)
          y = Identity (r)
        }
        """
    )
    before = model.copy()
    model.bypass(model.node("Identity_0"))
    model.cleanup()
    assert op_types(model) == ["Relu"]
    assert [t.name for t in model.outputs] == ["y"]
    assert model.nodes[0].outputs[0].name == "y"
    assert_equivalent(before, model, rtol=0.0)
    assert_valid(model)


def test_bypass_wiring_an_input_straight_to_the_output_keeps_both_names():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[N,4] x) => (float[N,4] y) {
          y = Identity (x)
        }
        """
    )
    before = model.copy()
    model.bypass(model.node("Identity_0"))
    model.cleanup()
    assert [t.name for t in model.inputs] == ["x"]
    assert [t.name for t in model.outputs] == ["y"]
    assert op_types(model) == ["Identity"]  # the minimum that keeps two distinct names
    assert_equivalent(before, model, rtol=0.0)
    assert_valid(model)


def test_bypass_with_other_readers_of_the_output():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[N,4] x) => (float[N,4] y, float[N,4] z) {
          r = Relu (x)
          y = Identity (r)
          z = Sigmoid (y)
        }
        """
    )
    before = model.copy()
    model.bypass(model.node("Identity_0"))
    model.cleanup()
    assert op_types(model) == ["Relu", "Sigmoid"]
    assert [t.name for t in model.outputs] == ["y", "z"]
    assert model.node("Sigmoid_0").inputs[0].name == "y"
    assert_equivalent(before, model, rtol=0.0)
    assert_valid(model)


def test_replace_uses_with_a_tensor_that_is_already_an_output():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[N,4] x) => (float[N,4] y, float[N,4] z) {
          y = Relu (x)
          z = Identity (y)
        }
        """
    )
    before = model.copy()
    model.bypass(model.node("Identity_0"))
    model.cleanup()
    assert [t.name for t in model.outputs] == ["y", "z"]
    assert_equivalent(before, model, rtol=0.0)
    assert_valid(model)


def test_replace_uses_with_a_constant_keeps_the_output_name():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[N,4] x) => (float[N,4] y, float[2] z) <float[2] k> {
          y = Relu (x)
          z = Identity (k)
        }
        """
    )
    before = model.copy()
    model.bypass(model.node("Identity_0"))
    model.cleanup()
    assert [t.name for t in model.outputs] == ["y", "z"]
    assert_equivalent(before, model, rtol=0.0)
    assert_valid(model)


# ---------------------------------------------------------------------- fingerprint
def test_fingerprint_is_stable_and_tracks_weights(tmp_path, conv_relu):
    fp = conv_relu.fingerprint()
    assert fp == conv_relu.fingerprint() == conv_relu.copy().fingerprint()
    assert Model.load(conv_relu.save(tmp_path / "m.onnx")).fingerprint() == fp
    assert Model.load(conv_relu.save(tmp_path / "e.onnx", external_data=True)).fingerprint() == fp
    changed = conv_relu.copy()
    w = changed.tensor("w")
    values = np.array(w.values)
    values[0, 0, 0, 0] += 1e-3
    w.values = values
    assert changed.fingerprint() != fp
    assert conv_relu.fingerprint() == fp  # the copy is independent
    renamed = conv_relu.copy()
    renamed.nodes[0].name = "conv"
    assert renamed.fingerprint() != fp


def test_fingerprint_tells_weights_apart_across_tensor_boundaries():
    """Two models whose weights concatenate to the same bytes must still differ."""
    text = """
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[N,2] x) => (float[N,2] y) <float[2] a, float[2] b> {
      s = Add (x, a)
      y = Add (s, b)
    }
    """
    one = make_model(text, {"a": np.array([1, 2], np.float32), "b": np.array([3, 4], np.float32)})
    two = make_model(text, {"a": np.array([1, 2], np.float32), "b": np.array([3, 4], np.float32)})
    assert one.fingerprint() == two.fingerprint()
    three = make_model(text, {"a": np.array([3, 4], np.float32), "b": np.array([1, 2], np.float32)})
    assert three.fingerprint() != one.fingerprint()


def test_constant_value_looks_through_identity_chains():
    model = make_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        + """g (float[2] x) => (float[2] y) <float[2] c = {1.0, 2.0}> {
            i1 = Identity(c)
            i2 = Identity(i1)
            y = Add(x, i2)
        }"""
    )
    np.testing.assert_array_equal(model.constant_value(model.tensor("i2")), [1.0, 2.0])
    assert model.constant_value(model.tensor("y")) is None
