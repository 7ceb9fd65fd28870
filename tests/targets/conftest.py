"""Fixtures of the target tests: tiny models, a restored target registry, and a TVM RPC
farm on loopback (a tracker and two servers) whose process groups are killed afterwards.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

#: Seconds the farm may take to come up (imports of TVM in three processes on 2 cores).
_STARTUP_TIMEOUT = 180.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: tunes with MetaSchedule (tens of seconds); deselect with -m 'not slow'"
    )


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`tailor` CLI runs reconfigure the root logger onto pytest's captured (then closed)
    streams; later log records would fail to print."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _restore_target_registry() -> Iterator[None]:
    """Targets a test registers (YAML files) do not leak into the next test."""
    from tailor.targets import target as registry

    saved = dict(registry._registered)
    yield
    registry._registered.clear()
    registry._registered.update(saved)


@pytest.fixture(scope="session")
def tiny_conv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 3x3 Conv (4 -> 8 channels, 8x8) + Relu with a dynamic batch: one tuning task."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path_factory.mktemp("models") / "tiny_conv.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def pruned_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits CNN, fused and with half its channels pruned (only fused where
    the prune_channels pass is not installed)."""
    from tailor.ir import Model
    from tailor.passes import PassContext, PassManager, available_passes

    pipeline = "fuse"
    if "prune_channels" in available_passes():
        pipeline += ",prune_channels(ratio=0.5,reconstruct=false)"
    model = Model.load(EXAMPLES / "digits_cnn.onnx")
    pruned = PassManager.from_text(pipeline).run(model, PassContext()).model
    path = tmp_path_factory.mktemp("models") / "digits_pruned.onnx"
    pruned.save(path)
    return path


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RPCFarm:
    """A tracker and its servers on loopback."""

    address: str
    key: str
    servers: int


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, TVM_NUM_THREADS="1")  # two servers: at most two threads in all
    with open(log, "wb") as out:
        # A session of its own: killpg then reaches the server's popen_worker children too.
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL, to each whole process group; asserts nothing survives."""
    for proc in processes:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in processes:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    import psutil

    groups = {proc.pid for proc in processes}
    survivors = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            # Zombies are dead: orphans wait there until init reaps them.
            if os.getpgid(p.pid) in groups and p.info["status"] != psutil.STATUS_ZOMBIE:
                survivors.append(p.pid)
        except (ProcessLookupError, PermissionError):
            continue
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"processes of the RPC farm survived: {survivors}"


def _wait(condition, what: str, processes: list[subprocess.Popen], logs: list[Path]) -> None:
    """Polls `condition` until it holds; fails at once if a farm process died."""
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while not condition():
        for proc, log in zip(processes, logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a process exited:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {_STARTUP_TIMEOUT:g} s")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def rpc_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RPCFarm]:
    """`python -m tvm.exec.rpc_tracker` and two `tvm.exec.rpc_server`s with one key."""
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado")
    from tailor.targets.rpc import device_keys

    logs_dir = tmp_path_factory.mktemp("rpc")
    port, key = free_port(), "tailor-test"
    processes: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        log = logs_dir / "tracker.log"
        tracker = [
            "tvm.exec.rpc_tracker",
            *("--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)),
        ]
        processes.append(_start(tracker, log))
        logs.append(log)
        for i in range(2):
            server_port = free_port()
            server = [
                "tvm.exec.rpc_server",
                *("--host", "127.0.0.1", "--port", str(server_port)),
                *("--port-end", str(server_port + 1), "--tracker", f"127.0.0.1:{port}"),
                *("--key", key),
            ]
            log = logs_dir / f"server{i}.log"
            processes.append(_start(server, log))
            logs.append(log)

        def tracker_up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        _wait(tracker_up, "RPC tracker", processes, logs)
        address = f"127.0.0.1:{port}"
        _wait(lambda: device_keys(address).get(key) == 2, "RPC servers", processes, logs)
        yield RPCFarm(address, key, 2)
    finally:
        _stop(processes)
