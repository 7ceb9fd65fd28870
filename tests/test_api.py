"""The Python API: sources it accepts, input models never modified, calibration files read
without pickle, and the saved model carrying its pipeline."""

from __future__ import annotations

import numpy as np
import pytest

import tailor
from tailor.api import load_calibration, parse_input_shape, run_pipeline
from tailor.errors import TailorError, UnknownPassError
from tailor.ir import Model
from tests.helpers import assert_equivalent, make_model, op_types

CONV_BN = """
<ir_version: 8, opset_import: ["": 17]>
g (float[N,3,8,8] x) => (float[N,8,8,8] y)
<float[8,3,3,3] w, float[8] s, float[8] b, float[8] mu, float[8] var> {
    a = Conv<pads=[1,1,1,1]>(x, w)
    y = BatchNormalization(a, s, b, mu, var)
}
"""

TWO_INPUTS = """
<ir_version: 8, opset_import: ["": 17]>
g (float[N,4] a, float[N,4] b) => (float[N,4] y) {
    y = Add(a, b)
}
"""


@pytest.fixture
def model():
    return make_model(CONV_BN, {"var": np.full(8, 0.7, np.float32)})


@pytest.mark.parametrize("kind", ["path", "bytes", "proto", "model"])
def test_run_pipeline_accepts_every_source_and_never_modifies_the_input(tmp_path, model, kind):
    path = model.save(tmp_path / "m.onnx")
    source = {
        "path": str(path),
        "bytes": path.read_bytes(),
        "proto": model.to_proto(),
        "model": model,
    }[kind]
    before = model.fingerprint()
    result = run_pipeline(source, "fuse", tmp_path / "out.onnx")
    assert model.fingerprint() == before
    assert op_types(result.model) == ["Conv"]
    assert result.pipeline == "fuse" and result.modified
    saved = Model.load(tmp_path / "out.onnx")
    assert saved.metadata["tailor.pipeline"] == "fuse"
    assert saved.metadata["tailor.version"] == tailor.__version__
    assert_equivalent(model, saved)


def test_top_level_functions_are_the_api(model):
    assert tailor.run_pipeline is run_pipeline
    summary = tailor.inspect_model(model)
    assert [layer.name for layer in summary.layers] == ["Conv_0"]
    with pytest.raises(AttributeError):
        tailor.no_such_function  # noqa: B018


def test_run_pipeline_without_output_saves_nothing(tmp_path, model):
    result = run_pipeline(model, "fold_batchnorm")
    assert op_types(result.model) == ["Conv"]
    assert list(tmp_path.iterdir()) == []


def test_pipeline_errors_come_before_loading_the_model(tmp_path):
    # A bad pipeline is reported even though the model path is bad too.
    with pytest.raises(UnknownPassError):
        run_pipeline(tmp_path / "missing.onnx", "no_such_pass", tmp_path / "o.onnx")


def test_metadata_of_the_source_is_kept(tmp_path, model):
    model.set_metadata("author", "me")
    model.set_metadata("author", "you")  # replaced, not duplicated
    result = run_pipeline(model, "fuse")
    assert result.model.metadata == {
        "author": "you",
        "tailor.pipeline": "fuse",
        "tailor.version": tailor.__version__,
    }
    assert model.metadata == {"author": "you"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x=1,3,224,224", ("x", [1, 3, 224, 224])),
        ("1,3,8,8", (None, [1, 3, 8, 8])),
        ("input.1=1x3x8x8", ("input.1", [1, 3, 8, 8])),
        ("a=b=4", ("a=b", [4])),
    ],
)
def test_parse_input_shape(text, expected):
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize("text", ["", "x=", "=1,2", "x=1,0", "x=-1,3", "x=a,b"])
def test_parse_input_shape_refuses(text):
    with pytest.raises(TailorError, match="bad input shape"):
        parse_input_shape(text)


def test_load_calibration_variants(tmp_path, model):
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "named.npz", x=x)
    np.savez(tmp_path / "single.npz", anything=x)
    np.savez(tmp_path / "many.npz", calib_x=x, labels=np.arange(5))
    np.save(tmp_path / "plain.npy", x.astype(np.float64))
    for name in ("named.npz", "single.npz", "many.npz:calib_x", "plain.npy"):
        data = load_calibration(tmp_path / name, model)
        assert list(data) == ["x"]
        assert data["x"].dtype == np.float32  # converted to the input's type
        np.testing.assert_allclose(data["x"], x)


def test_load_calibration_refuses(tmp_path, model):
    x = np.zeros((2, 3, 8, 8), np.float32)
    np.savez(tmp_path / "many.npz", calib_x=x, labels=np.arange(2))
    with pytest.raises(TailorError, match="no array for input"):
        load_calibration(tmp_path / "many.npz", model)
    with pytest.raises(TailorError, match="does not exist"):
        load_calibration(tmp_path / "nope.npz", model)
    np.savez(tmp_path / "rank.npz", x=np.zeros((3, 8, 8), np.float32))
    with pytest.raises(TailorError, match="rank 4"):
        load_calibration(tmp_path / "rank.npz", model)
    np.savez(tmp_path / "text.npz", x=np.full((1, 3, 8, 8), "a"))
    with pytest.raises(TailorError, match="dtype"):
        load_calibration(tmp_path / "text.npz", model)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(TailorError, match="cannot read"):
        load_calibration(tmp_path / "junk.npz", model)
    np.savez(tmp_path / "pickle.npz", x=np.array([object()], dtype=object))
    with pytest.raises(TailorError, match="cannot read"):
        load_calibration(tmp_path / "pickle.npz", model)
    two = make_model(TWO_INPUTS)
    np.savez(tmp_path / "ab.npz", a=np.zeros((2, 4), np.float32))
    with pytest.raises(TailorError, match="'b'"):
        load_calibration(tmp_path / "ab.npz", two)
    with pytest.raises(TailorError, match="2 inputs"):
        load_calibration(f"{tmp_path / 'many.npz'}:calib_x", two)


def test_calibration_is_used_for_the_lossless_check(tmp_path, model):
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    result = run_pipeline(model, "fuse", calibration=tmp_path / "calib.npz")
    assert "max abs error" in result.records[0].check


def test_output_must_be_a_file_in_an_existing_folder(tmp_path, model):
    with pytest.raises(TailorError, match="is a directory"):
        run_pipeline(model, "fuse", tmp_path)
    with pytest.raises(TailorError, match="does not exist"):
        run_pipeline(model, "fuse", tmp_path / "a" / "b.onnx")
