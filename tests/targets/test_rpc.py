"""Reaching devices through a TVM RPC tracker: a module runs on a loopback server and
matches onnxruntime; every way of not reaching a device is a one-line error."""

from __future__ import annotations

import socket

import pytest

from tailor.cli import main
from tailor.errors import RPCError
from tailor.targets.rpc import check_key, connect, device_keys, parse_tracker
from tailor.targets.tvm_build import build, compare_with_onnxruntime, make_inputs

from .conftest import free_port


@pytest.mark.parametrize("text", ["localhost", "host:", ":9190", "host:port", "host:70000"])
def test_bad_tracker_addresses(text):
    with pytest.raises(RPCError, match="expected HOST:PORT"):
        parse_tracker(text)


def test_tracker_address_forms():
    assert str(parse_tracker("10.0.0.5:9190")) == "10.0.0.5:9190"
    assert parse_tracker("[::1]:9190").host == "::1"


def test_unreachable_tracker_fails_fast_in_one_line():
    port = free_port()
    with pytest.raises(
        RPCError, match=f"no TVM RPC tracker at 127.0.0.1:{port}: connection refused"
    ) as info:
        device_keys(f"127.0.0.1:{port}", timeout=2)
    assert "\n" not in str(info.value)


def test_a_silent_peer_is_not_a_tracker():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts connections, never answers the handshake
        port = listener.getsockname()[1]
        with pytest.raises(RPCError, match="does not answer as a TVM RPC tracker within 0.5 s"):
            device_keys(f"127.0.0.1:{port}", timeout=0.5)


def test_unknown_key_lists_the_registered_ones(rpc_farm):
    assert check_key(rpc_farm.address, rpc_farm.key) == 2
    with pytest.raises(
        RPCError, match=r"no device with key 'rpi9' .* \(registered keys: tailor-test \(2\)\)"
    ):
        connect(rpc_farm.address, "rpi9", timeout=5)


def test_pruned_model_runs_over_rpc_and_matches_onnxruntime(rpc_farm, pruned_digits):
    built = build(pruned_digits, "host")
    with connect(rpc_farm.address, rpc_farm.key, target="host") as device:
        cmp = compare_with_onnxruntime(pruned_digits, built, run=device.run)
        assert cmp.max_rel <= 1e-5, cmp
        timing = device.time(built, make_inputs(built.inputs), number=2, repeat=2)
    assert len(timing.results) == 2 and all(t > 0 for t in timing.results)


def test_a_module_for_another_device_is_refused(rpc_farm, tiny_conv):
    built = build(tiny_conv, "jetson-nano")
    with connect(rpc_farm.address, rpc_farm.key, target="host") as device:
        with pytest.raises(RPCError, match="compiled for 'jetson-nano'"):
            device.run(built, make_inputs(built.inputs))


def test_cli_tune_with_unreachable_tracker(tiny_conv, tmp_path, capsys):
    port = free_port()
    args = ["tune", str(tiny_conv), "-t", "host", "--rpc", f"127.0.0.1:{port}", "--key", "x"]
    assert main([*args, "--cache-dir", str(tmp_path), "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "connection refused" in err
    assert not list(tmp_path.iterdir())  # nothing created before the tracker answered


def test_cli_tune_with_unknown_key(rpc_farm, tiny_conv, tmp_path, capsys):
    args = ["tune", str(tiny_conv), "-t", "host", "--rpc", rpc_farm.address, "--key", "rpi9"]
    assert main([*args, "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no device with key 'rpi9'" in err
