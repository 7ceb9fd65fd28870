"""The `tailor` command line: output of inspect/run/passes, exit codes, one-line errors and
no output file left behind on failure."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from tailor.cli import main
from tailor.ir import Model
from tailor.passes import Pass, PassResult, register
from tailor.passes import registry as registry_module
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types

CONV_BN = """
<ir_version: 8, opset_import: ["": 17]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8] s, float[8] b, float[8] mu, float[8] var, float[4,8,1,1] w2> {
    a = Conv<pads=[1,1,1,1]>(x, w1)
    n = BatchNormalization(a, s, b, mu, var)
    r = Relu(n)
    y = Conv(r, w2)
}
"""


@pytest.fixture
def model_path(tmp_path):
    var = np.linspace(0.5, 2.0, 8, dtype=np.float32)
    path = tmp_path / "model.onnx"
    make_model(CONV_BN, {"var": var}).save(path)
    return path


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """Exit 2 and exactly one line on stderr, naming the cause."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1, err
    assert lines[0].startswith("tailor: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------- inspect
def test_inspect_table(capsys, model_path):
    code, out, _ = cli(capsys, "inspect", model_path)
    assert code == 0
    assert "Conv_0" in out and "Conv_1" in out
    assert "1x3x8x8" in out and "1x8x8x8" in out
    # Conv_0: 8 out channels * 8*8 positions * 3*3*3 MACs each = 13,824.
    assert "13,824" in out
    assert "2 layers, 4 nodes" in out


def test_inspect_json(capsys, model_path):
    code, out, _ = cli(capsys, "inspect", model_path, "--json")
    assert code == 0
    data = json.loads(out)
    assert [layer["name"] for layer in data["layers"]] == ["Conv_0", "Conv_1"]
    assert data["layers"][0]["macs"] == 8 * 8 * 8 * 27
    assert data["layers"][1]["params"] == 4 * 8
    assert data["ops"] == {"Conv": 2, "BatchNormalization": 1, "Relu": 1}
    assert data["macs"] == 8 * 8 * 8 * 27 + 4 * 8 * 8 * 8


def test_inspect_with_input_shape_fixes_symbolic_dims(capsys, tmp_path):
    text = CONV_BN.replace("float[N,3,8,8] x", "float[N,3,H,W] x").replace(
        "float[N,4,8,8] y", "float[N,4,H,W] y"
    )
    path = tmp_path / "dyn.onnx"
    make_model(text).save(path)
    code, out, _ = cli(capsys, "inspect", path, "--json")
    assert code == 0 and json.loads(out)["macs"] is None  # unknown spatial size
    code, out, _ = cli(capsys, "inspect", path, "--json", "--input-shape", "x=1,3,16,16")
    assert code == 0 and json.loads(out)["layers"][0]["output_shape"] == [1, 8, 16, 16]
    code, out, _ = cli(capsys, "inspect", path, "--json", "--input-shape", "1,3,4,4")
    assert code == 0 and json.loads(out)["layers"][0]["output_shape"] == [1, 8, 4, 4]


@pytest.mark.parametrize(
    ("shape", "needle"),
    [("y=1,3,8,8", "'y'"), ("x=1,3,8", "rank"), ("x=1,a,8,8", "bad input shape"), ("x=", "bad")],
)
def test_inspect_bad_input_shape(capsys, model_path, shape, needle):
    code, _, err = cli(capsys, "inspect", model_path, "--input-shape", shape)
    assert_user_error(code, err, needle)


# ---------------------------------------------------------------------- run
def test_run_fuse_writes_an_equivalent_model_with_the_pipeline(capsys, model_path, tmp_path):
    out_path = tmp_path / "out" / "fused.onnx"
    out_path.parent.mkdir()
    code, out, err = cli(capsys, "run", model_path, "-p", "FUSE", "-o", out_path)
    assert code == 0, err
    assert "folded BatchNormalization_0 into Conv_0" in out
    assert out.strip().splitlines()[-1] == "pipeline: fuse"
    assert "[1/1] fuse" in err  # progress goes to stderr
    before, after = Model.load(model_path), Model.load(out_path)
    assert "BatchNormalization" not in op_types(after)
    assert after.metadata["tailor.pipeline"] == "fuse"
    assert_valid(after)
    assert_equivalent(before, after)


def test_run_quiet_prints_only_the_pipeline(capsys, model_path, tmp_path):
    code, out, err = cli(
        capsys,
        "run",
        model_path,
        "-p",
        "fold_batchnorm(layers=op:Conv)",
        "-o",
        tmp_path / "o.onnx",
        "-q",
    )
    assert code == 0 and err == ""
    assert out == "pipeline: fold_batchnorm(layers=op:Conv)\n"


def _corrupt(path):
    path.write_bytes(b"\x08\x07garbage that is not protobuf\xff\xff\xff")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _foreign_domain(path):
    proto = onnx.load(path)
    proto.graph.node[2].domain = "com.example"
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(proto, path)


def _missing(path):
    path.unlink()


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_corrupt, "model.onnx"),
        (_truncate, "model.onnx"),
        (_foreign_domain, "com.example"),
        (_missing, "does not exist"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "run"])
def test_bad_model_files(capsys, model_path, tmp_path, damage, needle, command):
    damage(model_path)
    out_path = tmp_path / "out.onnx"
    args = [command, model_path] + (["-p", "fuse", "-o", out_path] if command == "run" else [])
    code, _, err = cli(capsys, *args)
    assert_user_error(code, err, needle)
    assert not out_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in tmp_path.iterdir() if p.name == "model.onnx"]
    )


@pytest.mark.parametrize(
    ("pipeline", "needle"),
    [
        ("fuse(", "column"),
        ("fuse,,fuse", "column"),
        ("fusee", "did you mean fuse"),
        ("fuse(rounds=3)", "max_rounds"),
        ("fuse(max_rounds=0)", "minimum"),
        ("fuse(max_rounds=two)", "max_rounds"),
        ("fuse(layers='op:')", "layers"),
    ],
)
def test_bad_pipelines(capsys, model_path, tmp_path, pipeline, needle):
    out_path = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "run", model_path, "-p", pipeline, "-o", out_path)
    assert_user_error(code, err, needle)
    assert not out_path.exists()


def test_bad_flags(capsys, model_path, tmp_path):
    code, _, err = cli(capsys, "run", model_path, "-o", tmp_path / "o.onnx")
    assert_user_error(code, err, "--pipeline")
    code, _, err = cli(
        capsys, "run", model_path, "-p", "fuse", "-o", tmp_path / "o.onnx", "--check", "x"
    )
    assert_user_error(code, err, "--check")
    code, _, err = cli(capsys, "frobnicate")
    assert_user_error(code, err, "frobnicate")
    code, _, err = cli(capsys, "run", model_path, "-p", "fuse", "-o", tmp_path / "no" / "o.onnx")
    assert_user_error(code, err, "does not exist")
    assert not (tmp_path / "no").exists()


class _BreaksOutputs(Pass):
    """Test pass: claims to be lossless but scales every Conv weight."""

    name = "_test_breaks_outputs"
    lossless = True

    def run(self, model, context):
        for node in model.nodes:
            if node.op == "Conv":
                node.inputs[1].values = node.inputs[1].values * 2
        return PassResult(model, True, ["doubled conv weights"])


@pytest.fixture
def breaking_pass():
    yield _BreaksOutputs.name
    registry_module._REGISTRY.pop(_BreaksOutputs.name, None)


def test_a_failing_pass_leaves_an_existing_output_untouched(
    capsys, model_path, tmp_path, breaking_pass
):
    register(_BreaksOutputs)
    out_path = tmp_path / "out.onnx"
    out_path.write_bytes(b"previous result")
    code, _, err = cli(capsys, "run", model_path, "-p", f"fuse,{breaking_pass}", "-o", out_path)
    assert_user_error(code, err, f"pass 2 '{breaking_pass}' (after fuse)", "outputs changed")
    assert out_path.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]


def test_calibration_data_errors(capsys, model_path, tmp_path):
    out_path = tmp_path / "o.onnx"
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 3, 8, 8), np.float32), labels=np.zeros(2))
    code, _, err = cli(
        capsys, "run", model_path, "-p", "fuse", "-o", out_path, "--data", tmp_path / "wrong.npz"
    )
    assert_user_error(code, err, "'x'", "images")
    code, _, err = cli(
        capsys,
        "run",
        model_path,
        "-p",
        "fuse",
        "-o",
        out_path,
        "--data",
        f"{tmp_path / 'wrong.npz'}:nope",
    )
    assert_user_error(code, err, "no array 'nope'")
    # Object arrays need pickle, which tailor never loads.
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}], dtype=object))
    code, _, err = cli(
        capsys, "run", model_path, "-p", "fuse", "-o", out_path, "--data", tmp_path / "pickled.npz"
    )
    assert_user_error(code, err, "pickled.npz")
    assert not out_path.exists()
    code, _, err = cli(
        capsys,
        "run",
        model_path,
        "-p",
        "fuse",
        "-o",
        out_path,
        "--data",
        f"{tmp_path / 'wrong.npz'}:images",
    )
    assert code == 0, err


# ---------------------------------------------------------------------- passes, misc
def test_passes_lists_every_builtin_pass_with_parameters(capsys):
    code, out, _ = cli(capsys, "passes")
    assert code == 0
    for name in ("fuse", "fold_batchnorm", "fold_pad", "fold_constants", "matmul_add_to_gemm",
                 "eliminate_dead", "eliminate_noops"):  # fmt: skip
        assert f"\n{name} (lossless): " in "\n" + out
    assert "max_rounds (int, in [1, 100], default 10)" in out
    code, out, _ = cli(capsys, "passes", "FUSE")
    assert code == 0 and out.startswith("fuse (lossless)") and "fold_constants" in out
    code, _, err = cli(capsys, "passes", "fold_bn")
    assert_user_error(code, err, "did you mean")


def test_version_and_help(capsys):
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.startswith("tailor, version ")
    code, out, _ = cli(capsys, "run", "--help")
    assert code == 0 and "--pipeline" in out


def test_debug_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", "inspect", str(tmp_path / "missing.onnx")])


def test_console_entry_point(model_path, tmp_path):
    """The installed `python -m tailor` runs, with exit codes as documented."""
    ok = subprocess.run(
        [sys.executable, "-m", "tailor", "inspect", str(model_path)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "Conv_0" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "tailor", "inspect", str(tmp_path / "nope.onnx")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
