"""A bounded, process-local cache of captured activations, keyed by what computes them.

A tensor's values on given inputs depend only on the part of the graph upstream of it
(the nodes, their attributes and weights, and the inputs). The key of a captured tensor
is a hash of exactly that, so a capture is reused by any later model that shares the
tensor's upstream part, whatever changed downstream of it: the reference activations a
data-driven pass reads from the model it starts from, and the layers upstream of a
change in a candidate the scheduler builds. That is most of the captures of a search,
where thousands of candidates differ from one model in a few layers.

Keys hash every weight byte upstream (blake2b, no sampling), the node types, domains and
attributes, the output position, and the input data; a graph with subgraph attributes
(If, Loop, Scan) upstream is not cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from tailor.ir.model import Model

__all__ = ["ActivationCache", "CACHE", "upstream_keys", "data_key"]

logger = logging.getLogger(__name__)

#: Bytes of activations kept (least recently used go first); TAILOR_ACTIVATION_CACHE_MB
#: overrides, 0 turns the cache off.
DEFAULT_BYTES = 512 << 20


def _hasher() -> hashlib._Hash:
    return hashlib.blake2b(digest_size=16)


def _array_digest(values: np.ndarray) -> bytes:
    h = _hasher()
    h.update(f"{values.dtype.str}{values.shape}".encode())
    h.update(memoryview(np.ascontiguousarray(values)).cast("B"))
    return h.digest()


def _constant_digest(t: gs.Constant) -> bytes:
    lazy = t._values  # noqa: SLF001 - hash the stored bytes without decoding them
    if isinstance(lazy, gs.ir.tensor.LazyValues) and not isinstance(
        lazy, gs.ir.tensor.SparseValues
    ):
        proto = lazy.tensor
        if proto.raw_data and not proto.external_data:
            h = _hasher()
            h.update(f"{proto.data_type}{tuple(proto.dims)}".encode())
            h.update(proto.raw_data)
            return h.digest()
    return _array_digest(np.asarray(t.values))


def _attr_text(value: object) -> bytes | None:
    """A stable encoding of an attribute value; None for subgraphs (not cached)."""
    if isinstance(value, gs.Graph):
        return None
    if isinstance(value, gs.Constant):
        return b"C" + _constant_digest(value)
    if isinstance(value, np.ndarray):
        return b"A" + _array_digest(value)
    if isinstance(value, (list, tuple)):
        parts = [_attr_text(v) for v in value]
        if any(p is None for p in parts):
            return None
        return b"L[" + b",".join(p for p in parts if p is not None) + b"]"
    return f"{type(value).__name__}:{value!r}".encode()


def upstream_keys(model: Model, names: Sequence[str]) -> dict[str, bytes | None]:
    """For each tensor name, a digest of everything its values depend on (None when it
    cannot be cached)."""
    memo: dict[int, bytes | None] = {}

    def tensor_key(t: gs.Tensor) -> bytes | None:
        if id(t) in memo:
            return memo[id(t)]
        # Iterative post-order walk: deep graphs would overflow Python's recursion.
        stack: list[tuple[gs.Tensor, bool]] = [(t, False)]
        while stack:
            cur, ready = stack.pop()
            if id(cur) in memo:
                continue
            if isinstance(cur, gs.Constant):
                memo[id(cur)] = b"K" + _constant_digest(cur)
                continue
            if not cur.name:
                memo[id(cur)] = b"E"  # an omitted optional input
                continue
            if not cur.inputs:  # a graph input: the data key covers its values
                memo[id(cur)] = f"I:{cur.name}".encode()
                continue
            node = cur.inputs[0]
            pending = [i for i in node.inputs if id(i) not in memo]
            if pending and not ready:
                stack.append((cur, True))
                stack.extend((i, False) for i in pending)
                continue
            memo[id(cur)] = _node_key(node, cur, memo)
        return memo[id(t)]

    tensors = model.tensors()
    return {n: tensor_key(tensors[n]) if n in tensors else None for n in names}


def _node_key(node: gs.Node, out: gs.Tensor, memo: Mapping[int, bytes | None]) -> bytes | None:
    inputs = [memo.get(id(i)) for i in node.inputs]
    if any(k is None for k in inputs):
        return None
    h = _hasher()
    h.update(f"{node.domain or ''}::{node.op}".encode())
    for name in sorted(node.attrs):
        text = _attr_text(node.attrs[name])
        if text is None:
            return None
        h.update(name.encode() + b"=" + text + b";")
    for k in inputs:
        h.update(k or b"")
        h.update(b"|")
    h.update(f"out{[o is out for o in node.outputs].index(True)}".encode())
    return h.digest()


def data_key(feeds: Mapping[str, np.ndarray], batch_size: int) -> bytes:
    """A digest of the input arrays (names, dtypes, shapes, values) and the batching."""
    h = _hasher()
    h.update(f"batch={batch_size}".encode())
    for name in sorted(feeds):
        h.update(name.encode())
        h.update(_array_digest(np.asarray(feeds[name])))
    return h.digest()


class ActivationCache:
    """Batches of captured tensors by key, least recently used dropped beyond `limit`
    bytes. Stored arrays are read-only, so a caller cannot change what the next sees."""

    def __init__(self, limit: int | None = None):
        if limit is None:
            env = os.environ.get("TAILOR_ACTIVATION_CACHE_MB")
            limit = int(float(env) * (1 << 20)) if env else DEFAULT_BYTES
        self.limit = limit
        self._items: OrderedDict[bytes, list[np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> list[np.ndarray] | None:
        with self._lock:
            batches = self._items.get(key)
            if batches is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return batches

    def put(self, key: bytes, batches: list[np.ndarray]) -> None:
        size = sum(b.nbytes for b in batches)
        if size > self.limit // 4:  # one tensor may not push everything else out
            return
        frozen = []
        for b in batches:
            b = np.array(b, copy=True)
            b.flags.writeable = False
            frozen.append(b)
        with self._lock:
            if key in self._items:
                return
            self._items[key] = frozen
            self._bytes += size
            while self._bytes > self.limit and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= sum(b.nbytes for b in dropped)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
            self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.limit > 0


#: The process's cache (each worker process has its own).
CACHE = ActivationCache()
