"""Targets: the shipped registry, host detection, YAML user targets, validation errors,
and the `tailor targets` command."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest

from tailor.cli import main
from tailor.errors import TargetError
from tailor.targets import Target, available_targets, get_target, load_targets, parse_targets

SHIPPED = [
    "host",
    "rpi4",
    "pixel4-cpu",
    "mali-g76",
    "adreno640",
    "jetson-nano",
    "jetson-tx2",
    "jetson-orin-nano",
]


def write(tmp_path: Path, text: str, name: str = "targets.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------- shipped targets
def test_shipped_targets_are_complete_and_accepted_by_tvm():
    targets = available_targets()
    assert list(targets)[: len(SHIPPED)] == SHIPPED
    for name in SHIPPED:
        t = targets[name]
        assert t.tvm().kind.name == t.kind
        # Every figure says where it comes from (host: detected or labelled estimates).
        for figure in (
            "peak_gflops.float32",
            "mem_bandwidth_gbs",
            "power_idle_w",
            "power_active_w",
        ):
            assert t.sources.get(figure), f"{name}: no source for {figure}"
        assert t.power_active_w >= t.power_idle_w > 0


@pytest.mark.parametrize(
    ("name", "kind", "device"),
    [
        ("rpi4", "llvm", "cpu"),
        ("pixel4-cpu", "llvm", "cpu"),
        ("mali-g76", "opencl", "gpu"),
        ("adreno640", "opencl", "gpu"),
        ("jetson-nano", "cuda", "gpu"),
        ("jetson-tx2", "cuda", "gpu"),
        ("jetson-orin-nano", "cuda", "gpu"),
    ],
)
def test_device_targets_are_aarch64_with_a_cross_compiler(name, kind, device):
    t = get_target(name)
    assert (t.kind, t.device_type, t.arch) == (kind, device, "aarch64")
    assert t.cross_compiler and not t.is_native
    if device == "gpu":
        assert t.tvm().host is not None  # GPU kinds carry their CPU host


def test_jetson_cuda_arches():
    arches = {
        n: get_target(n).tvm_target["arch"]
        for n in ("jetson-nano", "jetson-tx2", "jetson-orin-nano")
    }
    assert arches == {"jetson-nano": "sm_53", "jetson-tx2": "sm_62", "jetson-orin-nano": "sm_87"}


def test_host_is_detected():
    import os

    host = get_target("host")
    assert host.kind == "llvm" and host.is_native and host.cross_compiler is None
    assert 1 <= host.cores <= (os.cpu_count() or 1)
    assert host.tvm_target["num-cores"] == host.cores
    assert host.memory_mb > 0 and host.peak("float32") > 0
    assert host.sources["peak_gflops.float32"].startswith("estimate")


def test_targets_are_frozen_all_the_way_down():
    t = get_target("jetson-nano")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.cores = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        t.tvm_target["arch"] = "sm_80"  # type: ignore[index]
    with pytest.raises(TypeError):
        t.tvm_target["host"]["mcpu"] = "x"  # type: ignore[index]
    assert hash(t) == hash(get_target("jetson-nano"))
    assert Target.from_dict(t.to_dict()) == t
    json.dumps(t.to_dict())  # plain data


def test_peak_falls_back_to_float32():
    t = get_target("jetson-nano")
    assert "int8" not in t.peak_gflops
    assert t.peak("int8") == t.peak("float32")


def test_unknown_target_suggests_the_closest_name():
    with pytest.raises(TargetError, match=r"unknown target 'rpi3' \(did you mean 'rpi4'\?\)"):
        get_target("rpi3")


# ---------------------------------------------------------------------- YAML user targets
def test_yaml_target_extends_a_shipped_one(tmp_path):
    path = write(
        tmp_path,
        """
        name: my-pi
        extends: rpi4
        description: my Raspberry Pi 4 with 8 GB
        memory_mb: 8192
        sources: {memory_mb: "the 8 GB model"}
        """,
    )
    t = get_target(str(path))
    rpi4 = get_target("rpi4")
    assert t.name == "my-pi" and t.memory_mb == 8192
    assert t.tvm_target == rpi4.tvm_target and t.peak_gflops == rpi4.peak_gflops
    assert t.sources["memory_mb"] == "the 8 GB model"
    assert t.sources["power_idle_w"] == rpi4.sources["power_idle_w"]
    # An overridden figure without a new source loses the base's (it would mislabel it).
    assert "description" not in t.sources
    assert get_target("my-pi") is t  # loading registered it


def test_yaml_list_and_file_colon_name(tmp_path):
    path = write(
        tmp_path,
        """
        targets:
          - name: board-a
            description: an aarch64 board
            tvm_target: {kind: llvm, mtriple: aarch64-linux-gnu, mcpu: cortex-a53}
            cross_compiler: aarch64-linux-gnu-g++
            cores: 4
            peak_gflops: {float32: 19.2}
            mem_bandwidth_gbs: 6.4
            memory_mb: 1024
            storage_mb: 8192
            power_idle_w: 1.0
            power_active_w: 3.0
          - name: board-b
            extends: board-a
            cores: 2
        """,
    )
    a, b = load_targets(path)
    assert (a.name, b.name, b.cores, b.mem_bandwidth_gbs) == ("board-a", "board-b", 2, 6.4)
    assert get_target(f"{path}:board-b") == b
    with pytest.raises(TargetError, match="defines 2 targets; pick one"):
        get_target(str(path))
    with pytest.raises(TargetError, match="defines no target 'board-c'"):
        get_target(f"{path}:board-c")
    with pytest.raises(TargetError, match="target file .*missing.yaml does not exist"):
        get_target(f"{tmp_path}/missing.yaml:board-a")


BASE = """
name: bad
description: x
tvm_target: {kind: llvm}
cores: 2
peak_gflops: {float32: 10}
mem_bandwidth_gbs: 5
memory_mb: 100
storage_mb: 100
power_idle_w: 1
power_active_w: 2
"""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("cpu_cores: 4", r"unknown field 'cpu_cores' \(did you mean 'cores'\?\)"),
        (
            "tvm_target: {kind: cudaa, host: {kind: llvm}}",
            r"unknown TVM target kind 'cudaa' \(did you mean 'cuda'\?\)",
        ),
        ("tvm_target: {kind: opencl}", "needs a CPU 'host'"),
        ("tvm_target: {kind: llvm, mcpuu: cortex-a72}", "TVM rejects its tvm_target: .*mcpuu"),
        ("cores: 0", "cores must be a positive integer"),
        ("cores: 2.5", "cores must be a positive integer"),
        ("peak_gflops: {int8: 10}", "include float32"),
        ("peak_gflops: {float32: 10, bfloat8: 3}", "unknown dtype 'bfloat8'"),
        ("power_active_w: 0.5", r"power_active_w \(0.5\) is below power_idle_w"),
        ("name: Bad Name", "must be lower case"),
        ("extends: rpi5", r"extends unknown target 'rpi5' \(did you mean 'rpi4'\?\)"),
    ],
)
def test_invalid_targets_say_what_is_wrong(tmp_path, change, message):
    key = change.split(":")[0]
    lines = [line for line in BASE.strip().splitlines() if not line.startswith(f"{key}:")]
    path = write(tmp_path, "\n".join([*lines, change]) + "\n")
    with pytest.raises(TargetError, match=message) as info:
        load_targets(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_fields_are_listed(tmp_path):
    path = write(tmp_path, "name: half\ndescription: x\ncores: 2\n")
    with pytest.raises(TargetError, match="lacks tvm_target, peak_gflops, mem_bandwidth_gbs"):
        load_targets(path)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "name: x\ncores: [1, 2\npower_idle_w: 1\n")
    with pytest.raises(TargetError, match=r"invalid YAML at line \d+, column \d+"):
        load_targets(path)


def test_a_different_target_cannot_take_a_shipped_name(tmp_path):
    path = write(tmp_path, "name: rpi4\nextends: rpi4\ncores: 2\n")
    with pytest.raises(TargetError, match="a target named 'rpi4' already exists.*extends: rpi4"):
        load_targets(path)


@pytest.mark.parametrize("data", [[], "just text", {"targets": "no list"}, [1, 2]])
def test_wrong_yaml_shapes(data):
    with pytest.raises(TargetError):
        parse_targets(data)


# ---------------------------------------------------------------------- the CLI
def test_cli_lists_and_describes_targets(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in SHIPPED:
        assert f"\n{name} " in out or out.startswith(f"{name} ") or f"\n{name}  " in out
    assert main(["targets", "jetson-nano"]) == 0
    out = capsys.readouterr().out
    assert "sm_53" in out and "472 GFLOPS (FP16)" in out


def test_cli_json_and_user_file(tmp_path, capsys):
    path = write(tmp_path, "name: my-pi\nextends: rpi4\nmemory_mb: 8192\n")
    assert main(["targets", "--targets-file", str(path), "--json", "my-pi"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["name"] == "my-pi" and data[0]["memory_mb"] == 8192


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["targets", "rpi3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'rpi4'" in err
    bad = write(tmp_path, "name: x\ncores: [1\n")
    assert main(["targets", "--targets-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid YAML" in err
    assert main(["tune", "model.onnx", "--target", "jetsn-nano"]) == 2
    assert "did you mean 'jetson-nano'" in capsys.readouterr().err
