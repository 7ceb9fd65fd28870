"""Devices behind a TVM RPC tracker: replaces home-made device farms with TVM's tracker
protocol (`python -m tvm.exec.rpc_tracker`, servers registered with a device key), with a
timeout and a one-line error for every way reaching a device can fail.

    with connect("10.0.0.5:9190", "rpi4", target="rpi4") as device:
        outputs = device.run(built, feeds)
        timing = device.time(built, feeds)
"""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from tailor.errors import RPCError, ToolchainError
from tailor.targets.target import Target, get_target
from tailor.targets.tvm_build import BuiltModule, Timing, _arguments, _outputs, _time, export_module

__all__ = ["TrackerAddress", "parse_tracker", "device_keys", "check_key", "RemoteDevice", "connect"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds to wait for the tracker (connect, handshake, summary) and for a free device.
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class TrackerAddress:
    """Where a TVM RPC tracker listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_tracker(text: str | TrackerAddress) -> TrackerAddress:
    """`HOST:PORT` (`[::1]:9190` for IPv6) as a :class:`TrackerAddress`.

    Raises:
        RPCError: not of the form HOST:PORT with a port in 1..65535.
    """
    if isinstance(text, TrackerAddress):
        return text
    host, sep, port_text = str(text).strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RPCError(f"bad tracker address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return TrackerAddress(host, int(port_text))


def _with_timeout(fn: Callable[[], T], timeout: float, message: str) -> T:
    """Runs `fn` in a daemon thread; a call still blocked after `timeout` s is an RPCError.

    TVM's tracker client blocks without a timeout (a silent peer, a busy device key), so
    the call is left behind rather than hanging the caller.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RPCError(message)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _tracker_session(address: TrackerAddress, timeout: float) -> Any:
    """A connected `tvm.rpc.TrackerSession`, or an RPCError saying why not."""
    from tvm import rpc

    # A plain socket first: TVM's client retries a refused connection for 60 s.
    try:
        socket.create_connection((address.host, address.port), timeout=timeout).close()
    except socket.gaierror as e:
        raise RPCError(f"cannot resolve tracker host {address.host!r}: {e.strerror}") from e
    except ConnectionRefusedError as e:
        raise RPCError(
            f"no TVM RPC tracker at {address}: connection refused (start one with "
            f"`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {address.port}`)"
        ) from e
    except TimeoutError as e:
        raise RPCError(
            f"no answer from the TVM RPC tracker at {address} within {timeout:g} s"
        ) from e
    except OSError as e:
        raise RPCError(f"cannot reach the TVM RPC tracker at {address}: {e.strerror or e}") from e

    def handshake() -> Any:
        try:
            return rpc.connect_tracker(address.host, address.port)
        except (RuntimeError, OSError) as e:
            raise RPCError(f"{address} is not a TVM RPC tracker: {e}") from e

    return _with_timeout(
        handshake, timeout, f"{address} does not answer as a TVM RPC tracker within {timeout:g} s"
    )


def device_keys(
    tracker: str | TrackerAddress, *, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, int]:
    """The device keys registered at the tracker, with how many servers each has.

    Raises:
        RPCError: the tracker cannot be reached.
    """
    address = parse_tracker(tracker)
    session = _tracker_session(address, timeout)
    try:
        summary = _with_timeout(
            session.summary, timeout, f"the TVM RPC tracker at {address} sent no summary"
        )
    finally:
        session.close()
    counts: dict[str, int] = {}
    for server in summary.get("server_info", []):
        key = str(server.get("key", "")).split(":", 1)[-1]  # "server:KEY"
        counts[key] = counts.get(key, 0) + 1
    return counts


def check_key(tracker: str | TrackerAddress, key: str, *, timeout: float = DEFAULT_TIMEOUT) -> int:
    """How many servers with `key` the tracker has; an RPCError when none.

    Checked before requesting a session, because TVM's request for an unknown key waits
    forever.
    """
    address = parse_tracker(tracker)
    keys = device_keys(address, timeout=timeout)
    if not keys.get(key):
        known = ", ".join(f"{k} ({n})" for k, n in sorted(keys.items())) or "none"
        raise RPCError(
            f"no device with key {key!r} is registered at the TVM RPC tracker at {address} "
            f"(registered keys: {known})"
        )
    return keys[key]


class RemoteDevice:
    """One device, held through an RPC session requested from a tracker.

    Modules are exported here (with the target's compiler), uploaded once per built
    module, and run through a Relax VM on the device.
    """

    def __init__(self, session: Any, target: Target, address: TrackerAddress, key: str):
        self.session = session
        self.target = target
        self.address = address
        self.key = key
        self._loaded: dict[int, tuple[BuiltModule, Any]] = {}

    @property
    def device(self) -> Any:
        """The TVM device on the remote side (its CPU, or its GPU for GPU targets)."""
        return self.session.device(self.target.kind if self.target.is_gpu else "cpu", 0)

    def load(self, built: BuiltModule) -> Any:
        """Uploads the module (once) and loads it on the device; returns the remote module.

        A shared library is linked here with the target's compiler; without that compiler,
        the object files go as a `.tar` for the device's own compiler to link.
        """
        cached = self._loaded.get(id(built))
        if cached is not None and cached[0] is built:
            return cached[1]
        with tempfile.TemporaryDirectory(prefix="tailor-rpc-") as tmp:
            name = f"tailor_{id(built):x}"
            try:
                path = export_module(built, Path(tmp) / f"{name}.so")
            except ToolchainError as e:
                logger.warning("%s; sending object files for the device to link", e)
                path = export_module(built, Path(tmp) / f"{name}.tar")
            try:
                self.session.upload(str(path))
                module = self.session.load_module(path.name)
            except Exception as e:  # remote errors arrive as TVM errors with a remote traceback
                raise RPCError(
                    f"device {self.key!r} at {self.address} cannot load the module: "
                    f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
                ) from e
        self._loaded[id(built)] = (built, module)
        return module

    def _vm(self, built: BuiltModule) -> Any:
        from tvm import relax

        if built.target.kind != self.target.kind or built.target.arch != self.target.arch:
            raise RPCError(
                f"the module was compiled for {built.target.name!r}, but device {self.key!r} "
                f"is {self.target.name!r}"
            )
        return relax.VirtualMachine(self.load(built), self.device)

    def run(self, built: BuiltModule, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the module once on the device; outputs by ONNX output name."""
        vm = self._vm(built)
        return _outputs(built, vm["main"](*_arguments(built, feeds, self.device)))

    def time(
        self,
        built: BuiltModule,
        feeds: Mapping[str, np.ndarray],
        *,
        number: int = 10,
        repeat: int = 3,
    ) -> Timing:
        """Times the module on the device with TVM's `time_evaluator` (timed remotely)."""
        vm = self._vm(built)
        return _time(
            vm, self.device, _arguments(built, feeds, self.device), number=number, repeat=repeat
        )

    def close(self) -> None:
        """Releases the device for other clients of the tracker."""
        self._loaded.clear()
        self.session = None

    def __enter__(self) -> RemoteDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    tracker: str | TrackerAddress,
    key: str,
    *,
    target: Target | str = "host",
    timeout: float = DEFAULT_TIMEOUT,
    session_timeout: float = 0,
) -> RemoteDevice:
    """Requests a device with `key` from the tracker.

    Args:
        tracker: `HOST:PORT` of the tracker.
        key: the device key the servers registered with (`--key`).
        target: what the device is (decides which remote device runs the kernels).
        timeout: seconds to wait for the tracker and for a free device.
        session_timeout: seconds after which the server ends the session (0: never).

    Raises:
        RPCError: the tracker cannot be reached, knows no such key, or every device with
            the key stays busy for `timeout` seconds.
    """
    address = parse_tracker(tracker)
    target = get_target(target)
    count = check_key(address, key, timeout=timeout)
    session = _tracker_session(address, timeout)

    def request() -> Any:
        try:
            return session.request(key, priority=1, session_timeout=session_timeout)
        except (RuntimeError, OSError) as e:
            raise RPCError(f"device {key!r} at {address} refused a session: {e}") from e

    remote = _with_timeout(
        request,
        timeout,
        f"all {count} device(s) with key {key!r} at {address} stayed busy for {timeout:g} s",
    )
    logger.info("connected to device %r through %s", key, address)
    return RemoteDevice(remote, target, address, key)
