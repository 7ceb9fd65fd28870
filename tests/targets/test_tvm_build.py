"""Building ONNX models with TVM: host runs match onnxruntime, AArch64 cross-compiles,
GPU targets emit their kernels without a GPU, missing compilers fail in one line."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

from tailor.errors import DynamicShapeError, TargetError, ToolchainError
from tailor.ir import Model, run_model
from tailor.targets import Target, get_target
from tailor.targets.tvm_build import (
    build,
    compare_with_onnxruntime,
    elf_machine,
    export_module,
    make_inputs,
    run_local,
)

# float32 kernels of a different summation order than onnxruntime's.
RTOL = 1e-5


def test_pruned_digits_on_the_host_matches_onnxruntime(pruned_digits, tmp_path):
    built = build(pruned_digits, "host")
    assert [s.shape for s in built.inputs] == [(1, 1, 16, 16)]
    assert built.outputs == ["logits"] and not built.tuned
    assert built.device_sources() == {}
    cmp = compare_with_onnxruntime(pruned_digits, built)
    assert cmp.max_rel <= RTOL, cmp
    path = export_module(built, tmp_path / "digits.so")
    assert elf_machine(path) == elf_machine(os.path.realpath(sys.executable))


def test_dynamic_batch_compiles_for_the_given_batch(tiny_conv):
    built = build(tiny_conv, "host", batch=3)
    assert built.inputs[0].shape == (3, 4, 8, 8)
    feeds = make_inputs(built.inputs, seed=1)
    out = run_local(built, feeds)
    ref = run_model(Model.load(tiny_conv), feeds)
    np.testing.assert_allclose(out["y"], ref["y"], rtol=RTOL, atol=1e-5)
    with pytest.raises(ValueError, match="compiled for"):
        run_local(built, make_inputs([built.inputs[0].__class__("x", (1, 4, 8, 8), "float32")]))


def test_input_shapes_override_and_unknown_names(tiny_conv):
    built = build(tiny_conv, "host", input_shapes={"x": [2, 4, 8, 8]})
    assert built.inputs[0].shape == (2, 4, 8, 8)
    with pytest.raises(Exception, match="input shape given for nope"):
        build(tiny_conv, "host", input_shapes={"nope": [1]})


def test_symbolic_non_batch_dimension_needs_a_shape(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C"])],
    )
    model = Model.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(DynamicShapeError, match="axis 1"):
        build(model, "host")
    built = build(model, "host", input_shapes={"x": [2, 5]})
    assert run_local(built, {"x": -np.ones((2, 5), np.float32)})["y"].max() == 0


def test_aarch64_cross_compile_writes_an_aarch64_elf(pruned_digits, tmp_path):
    rpi4 = get_target("rpi4")
    if shutil.which(rpi4.cross_compiler) is None:
        pytest.skip(
            f"{rpi4.cross_compiler} is not installed (Debian/Ubuntu: apt-get install "
            "g++-aarch64-linux-gnu)"
        )
    built = build(pruned_digits, rpi4)
    path = export_module(built, tmp_path / "digits_rpi4.so")
    assert elf_machine(path) == "aarch64"
    # It cannot run here, and says how to run it.
    with pytest.raises(TargetError, match="--rpc HOST:PORT --key NAME"):
        run_local(built, make_inputs(built.inputs))


def test_tar_export_needs_no_compiler(tiny_conv, tmp_path):
    import tarfile

    built = build(tiny_conv, "pixel4-cpu")
    path = export_module(built, tmp_path / "conv.tar")
    names = tarfile.open(path).getnames()
    assert names and all(n.endswith(".o") for n in names)


def test_missing_cross_compiler_is_named(tiny_conv, tmp_path):
    board = Target.from_dict(
        {**get_target("rpi4").to_dict(), "name": "odd-board", "cross_compiler": "no-such-g++"}
    )
    built = build(tiny_conv, board)
    with pytest.raises(
        ToolchainError, match="cross compiler no-such-g\\+\\+ for target 'odd-board' is not on PATH"
    ):
        export_module(built, tmp_path / "conv.so")
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize(
    ("name", "kind", "marker"),
    [
        ("jetson-nano", "cuda", "__global__"),
        ("mali-g76", "opencl", "__kernel"),
    ],
)
def test_gpu_targets_emit_kernel_source_without_a_gpu(pruned_digits, name, kind, marker):
    built = build(pruned_digits, name)
    sources = built.device_sources()
    assert list(sources) == [kind]
    assert sources[kind].count(marker) >= 6  # one kernel or more per conv at least
    with pytest.raises(TargetError, match="cannot run on this machine"):
        run_local(built, make_inputs(built.inputs))


def test_cuda_source_is_for_the_jetson_arch(tiny_conv):
    sources = build(tiny_conv, "jetson-orin-nano").device_sources()
    assert "__global__" in sources["cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    # Where a CUDA toolkit exists, the emitted source must compile for the board's arch.
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.cu"
        src.write_text(sources["cuda"])
        proc = subprocess.run(
            [nvcc, "-arch=sm_87", "-ptx", str(src), "-o", str(Path(tmp) / "k.ptx")],
            capture_output=True,
            text=True,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_compare_outputs_like_the_ir_comparison():
    from tailor.targets.tvm_build import compare_outputs

    same = compare_outputs({"y": np.array([1.0, np.nan, np.inf])}, {"y": [1.0, np.nan, np.inf]})
    assert (same.max_abs, same.max_rel) == (0.0, 0.0)
    off = compare_outputs({"y": np.array([2.0, -4.0])}, {"y": np.array([2.0, -3.0])})
    assert (off.max_abs, off.max_rel) == (1.0, 0.25)
    assert compare_outputs({"y": np.array([1.0])}, {"y": np.array([np.nan])}).max_rel == np.inf
    with pytest.raises(ValueError, match="2 reference outputs but 1"):
        compare_outputs({"a": np.zeros(1), "b": np.zeros(1)}, {"a": np.zeros(1)})
