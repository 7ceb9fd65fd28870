"""Shared pieces of the storage passes: replaces a layer's float weight initializer with a
compact encoding plus a small decode subgraph of standard ONNX ops.

`prune_weights`, `quantize_weights` and `cluster_weights` share: finding the weights they
may rewrite (a weight read by a layer outside the selector, or by anything else, is left
alone, since rewriting it would change that reader too), building decode subgraphs
(bit and 4-bit unpacking in integer arithmetic that every opset from 7 on can express),
counting the bytes the encoding takes, and measuring the error it costs: each layer's
output on calibration data, or the weight-space error without data. The formats are
documented in docs/storage_formats.md.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from tailor.ir.activations import capture
from tailor.ir.layers import layer_weight
from tailor.ir.model import Constant, Model, Node, Tensor
from tailor.passes.base import Pass, PassContext, PassResult
from tailor.passes.rewrite import refresh_shapes

__all__ = [
    "STORAGE_ONLY",
    "WeightSite",
    "Decoder",
    "Encoded",
    "Encoder",
    "run_storage_pass",
    "weight_sites",
    "channel_axis",
    "pack_codes",
    "capture_outputs",
    "output_errors",
    "rel_error",
    "model_bytes",
    "skip",
]

logger = logging.getLogger(__name__)

#: What every storage pass says about latency, in its changes and docstring.
STORAGE_ONLY = "saves storage, not latency: the weight is decoded to float at run time"

#: Calibration samples used to measure per-layer output errors (bounds time and memory).
ERROR_SAMPLES = 64
#: Constants up to this size are shared between layers instead of repeated.
_POOL_MAX_BYTES = 64


@dataclass
class WeightSite:
    """One weight tensor to re-encode and the layers that read it.

    Args:
        tensor: the weight (an initializer or a Constant node's output).
        value: its value.
        readers: `(node, input index)` of every layer reading it.
        axis: the weight's output-channel axis (non-negative), shared by all readers.
    """

    tensor: Tensor
    value: np.ndarray = field(repr=False)
    readers: list[tuple[Node, int]] = field(default_factory=list)
    axis: int = 0

    @property
    def layers(self) -> list[str]:
        return [n.name for n, _ in self.readers]

    @property
    def label(self) -> str:
        return "+".join(self.layers)

    def rewire(self, decoded: Tensor) -> None:
        """Makes every reader read `decoded` instead of the float weight."""
        for node, index in self.readers:
            node.inputs[index] = decoded


def channel_axis(node: Node, weight_index: int, ndim: int) -> int:
    """The output-channel axis of a layer's weight (what per-channel scales run along)."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1  # [Cin, Cout/group, k...]
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    # MatMul: x @ W has output features on W's last axis; W @ x on W's second-to-last.
    return ndim - 1 if weight_index == 1 else ndim - 2


def skip(notes: dict[str, dict[str, Any]], layer: str, reason: str) -> None:
    """Notes why a layer was left alone."""
    old = notes[layer].get("skipped")
    notes[layer]["skipped"] = reason if old is None else f"{old}; {reason}"


def weight_sites(
    p: Pass, model: Model, notes: dict[str, dict[str, Any]] | None = None
) -> tuple[list[WeightSite], dict[str, dict[str, Any]]]:
    """The float weights of the layers `p` selects, grouped by tensor.

    A weight shared by several layers is one site when every reader is a selected layer
    reading it as its weight along the same channel axis; otherwise its layers are noted
    as skipped (rewriting it would change a reader the selector leaves out).

    Returns:
        The sites in topological order of their first reader, and the notes.
    """
    notes = notes if notes is not None else defaultdict(dict)
    sites: dict[int, WeightSite] = {}
    for node in model.nodes:
        if not p.selects(model, node):
            continue
        found = layer_weight(model, node)
        if found is None:
            continue
        index, value = found
        tensor = node.inputs[index]
        site = sites.setdefault(id(tensor), WeightSite(tensor, value))
        axis = channel_axis(node, index, value.ndim)
        if site.readers and axis != site.axis:
            site.axis = -1  # readers disagree; reported below
        elif not site.readers:
            site.axis = axis
        site.readers.append((node, index))
    out = []
    for site in sites.values():
        reason = _sharing_problem(model, site)
        if reason is not None:
            for layer in site.layers:
                skip(notes, layer, reason)
            continue
        out.append(site)
    return out, notes


def _sharing_problem(model: Model, site: WeightSite) -> str | None:
    t = site.tensor
    if model.is_graph_output(t) or model.is_graph_input(t):
        return f"its weight {t.name!r} is also a graph input or output"
    claimed = {(id(n), i) for n, i in site.readers}
    for consumer in model.consumers(t):
        for i, inp in enumerate(consumer.inputs):
            if inp is t and (id(consumer), i) not in claimed:
                return (
                    f"its weight {t.name!r} is also read by {consumer.op} {consumer.name!r}, "
                    "which the selector leaves out or which is not a layer"
                )
    if site.axis < 0:
        return f"the layers sharing weight {t.name!r} read it along different channel axes"
    return None


# ---------------------------------------------------------------------- packing
def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs unsigned `bits`-bit codes (`bits` divides 8) into bytes, plane by plane.

    With `k = 8 // bits` codes per byte and `m = ceil(n / k)` bytes, code `i * m + j` sits
    in bits `[i * bits, (i + 1) * bits)` of byte `j`: byte `j` holds codes `j`, `m + j`,
    `2m + j`, ... So the decoder extracts every plane with one broadcast division of the
    `[1, m]` bytes by `[k, 1]` powers of `2^bits`, and the `[k, m]` result, flattened, is
    the codes in order (padding at the end).

    Returns:
        A `[1, m]` uint8 array.
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit codes into bytes")
    flat = np.asarray(codes, np.int64).ravel()
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"{bits}-bit codes must be in 0..{(1 << bits) - 1}")
    k = 8 // bits
    m = -(-flat.size // k)
    planes = np.zeros(k * m, np.int64)
    planes[: flat.size] = flat
    packed = (planes.reshape(k, m) << (bits * np.arange(k)[:, None])).sum(axis=0)
    return packed.astype(np.uint8).reshape(1, m)


class Decoder:
    """Builds decode subgraphs in a model and counts the bytes of the constants they add.

    Small constants (shapes, bit weights) are shared between layers of one pass run.
    """

    def __init__(self, model: Model):
        self.model = model
        self.bytes = 0
        self._pool: dict[tuple[str, tuple[int, ...], bytes], Constant] = {}

    def const(self, hint: str, value: np.ndarray) -> Constant:
        """A new initializer; identical small ones are created once."""
        value = np.ascontiguousarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if value.nbytes <= _POOL_MAX_BYTES and key in self._pool:
            return self._pool[key]
        c = self.model.add_constant(hint, value)
        self.bytes += int(value.nbytes)
        if value.nbytes <= _POOL_MAX_BYTES:
            self._pool[key] = c
        return c

    def replace(self, tensor: Tensor, value: np.ndarray, hint: str) -> Tensor:
        """`value` in place of a constant: an initializer keeps its name, a Constant
        node's output is replaced by a new initializer (the caller rewires to it)."""
        if isinstance(tensor, Constant):
            tensor.values = np.ascontiguousarray(value)
            self.bytes += int(value.nbytes)
            return tensor
        return self.const(hint, value)

    def op(self, op: str, inputs: list[Tensor], hint: str, attrs: dict | None = None) -> Tensor:
        """Appends one node and returns its output."""
        return self.model.add_node(op, inputs, name=hint, attrs=attrs, domain="").outputs[0]

    def cast(self, x: Tensor, dtype: np.dtype, hint: str) -> Tensor:
        to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        return self.op("Cast", [x], f"{hint}_cast", {"to": to})

    def reshape(self, x: Tensor, shape: tuple[int, ...], hint: str) -> Tensor:
        return self.op(
            "Reshape", [x, self.const(f"{hint}_shape", np.asarray(shape, np.int64))], hint
        )

    def head(self, x: Tensor, count: int, hint: str) -> Tensor:
        """The first `count` elements of a 1-D tensor (Slice; attributes before opset 10)."""
        if self.model.opset >= 10:
            bounds = (("starts", 0), ("ends", count), ("axes", 0))
            ints = [self.const(f"{hint}_{k}", np.asarray([v], np.int64)) for k, v in bounds]
            return self.op("Slice", [x, *ints], hint)
        return self.op("Slice", [x], hint, {"starts": [0], "ends": [count], "axes": [0]})

    def unpack(self, packed: np.ndarray, bits: int, count: int, hint: str) -> Tensor:
        """int32 codes `[count]` from :func:`pack_codes` output."""
        k, base = 8 // bits, 1 << bits
        p = self.cast(self.const(f"{hint}_packed", packed), np.int32, f"{hint}_p")
        powers = self.const(f"int32_planes{bits}", (base ** np.arange(k, dtype=np.int32))[:, None])
        b = self.const(f"int32_{base}", np.asarray(base, np.int32))
        shifted = self.op("Div", [p, powers], f"{hint}_sh")  # [k, m]: plane i at the bottom
        if self.model.opset >= 10:
            digits = self.op("Mod", [shifted, b], f"{hint}_d")
        else:  # no Mod before opset 10: x - base * (x / base)
            top = self.op("Mul", [self.op("Div", [shifted, b], f"{hint}_q"), b], f"{hint}_t")
            digits = self.op("Sub", [shifted, top], f"{hint}_d")
        flat = self.reshape(digits, (-1,), f"{hint}_f")
        return flat if packed.size * k == count else self.head(flat, count, f"{hint}_h")


def model_bytes(model: Model) -> int:
    """Serialized size of the model (what `save` writes without external data)."""
    return int(model.to_proto().ByteSize())


# ---------------------------------------------------------------------- errors
def rel_error(reference: np.ndarray, approx: np.ndarray) -> float:
    """`||approx - reference|| / ||reference||`; 0 when both are zero."""
    a = np.asarray(reference, np.float64)
    b = np.asarray(approx, np.float64)
    num = float(np.linalg.norm(b - a))
    den = float(np.linalg.norm(a))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def capture_outputs(
    model: Model, data: Mapping[str, np.ndarray], tensors: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """The named tensors (`layer -> tensor name`) on the first calibration samples."""
    subset = {k: np.asarray(v)[:ERROR_SAMPLES] for k, v in data.items()}
    names = sorted(set(tensors.values()))
    values = capture(model, subset, names)
    return {layer: values[name] for layer, name in tensors.items()}


def output_errors(
    reference: Mapping[str, np.ndarray],
    model: Model,
    data: Mapping[str, np.ndarray],
    tensors: Mapping[str, str],
) -> dict[str, float]:
    """Relative error of each layer's output in `model` against the reference capture.

    The error is measured inside the whole rewritten model, so it includes what earlier
    rewritten layers changed upstream.
    """
    got = capture_outputs(model, data, tensors)
    return {layer: rel_error(reference[layer], got[layer]) for layer in tensors}


# ---------------------------------------------------------------------- the driver
@dataclass
class Encoded:
    """What an encoder built for one weight.

    Args:
        output: the decoded weight tensor the layers are to read.
        decoded: its value (for the weight-space error).
        summary: a few words for the change line ("int8 per-channel").
        note: extra per-layer figures.
        fallback: `fallback(reason)` encodes the weight without a decode subgraph, used
            when the subgraph would not pay for its nodes; None: the weight is skipped.
    """

    output: Tensor
    decoded: np.ndarray = field(repr=False)
    summary: str
    note: dict[str, Any] = field(default_factory=dict)
    fallback: Callable[[str], Encoded] | None = field(default=None, repr=False)


Encoder = Callable[[Decoder, WeightSite, str], "Encoded | str"]


def graph_bytes(nodes: list[Node]) -> int:
    """Serialized size of `nodes` and of a shape record for each output (an estimate of
    what a decode subgraph adds to the file besides its initializers)."""
    total = 0
    for node in nodes:
        proto = onnx.helper.make_node(
            node.op,
            [t.name for t in node.inputs],
            [t.name for t in node.outputs],
            name=node.name,
            domain=node.domain or None,
            **node.attrs,
        )
        total += proto.ByteSize() + sum(len(t.name) + 16 for t in node.outputs)
    return total


def run_storage_pass(p: Pass, model: Model, context: PassContext, encode: Encoder) -> PassResult:
    """Re-encodes every selected weight with `encode` and reports bytes and errors.

    `encode(decoder, site, hint)` builds the decode subgraph (names starting with `hint`)
    and returns an :class:`Encoded`, or the reason it leaves the weight alone. The
    layers are rewired to it only when its initializers and nodes together take fewer
    bytes than the float weight; the decoded tensor takes over the weight's name.
    """
    sites, notes = weight_sites(p, model)
    if not sites:
        return PassResult(model, False, [], dict(notes))
    data = context.calibration or None
    outputs = {n.name: n.outputs[0].name for site in sites for n, _ in site.readers}
    reference = capture_outputs(model, data, outputs) if data else None
    # Shapes first, so that the size before counts the same shape records as after.
    refresh_shapes(model)
    size_before = model_bytes(model)
    dec = Decoder(model)
    prefix = "".join(word[0] for word in p.name.split("_"))
    done: list[tuple[WeightSite, Encoded, int, int]] = []
    for i, site in enumerate(sites):
        start, first = dec.bytes, len(model.nodes)
        found = encode(dec, site, model.unique_name(f"{prefix}{i}"))
        if isinstance(found, str):
            for layer in site.layers:
                skip(notes, layer, found)
            continue
        data_bytes = dec.bytes - start
        extra = graph_bytes(model.nodes[first:])
        # A decode subgraph must pay for itself; a plain replacement initializer (the
        # dense encoding) is what the user asked for.
        if extra and data_bytes + extra >= site.value.nbytes:
            # Left unconnected, the subgraph is dropped by cleanup.
            why = (
                f"{found.summary} would take {data_bytes + extra:,} bytes "
                f"({extra:,} of them graph), not fewer than {site.value.nbytes:,}"
            )
            if found.fallback is None:
                for layer in site.layers:
                    skip(notes, layer, why)
                continue
            start, first = dec.bytes, len(model.nodes)
            found = found.fallback(why)
            data_bytes, extra = dec.bytes - start, graph_bytes(model.nodes[first:])
        _take_over(model, site, found.output)
        done.append((site, found, data_bytes, extra))
    if not done:
        model.cleanup()
        return PassResult(model, False, [], dict(notes))
    model.cleanup()
    refresh_shapes(model)
    errors: dict[str, float] = {}
    if reference is not None:
        kept = {layer: outputs[layer] for site, *_ in done for layer in site.layers}
        errors = output_errors({k: reference[k] for k in kept}, model, data, kept)
    changes = []
    total_before = total_after = 0
    for site, enc, data_bytes, extra in done:
        before, after = int(site.value.nbytes), data_bytes + extra
        total_before += before
        total_after += after
        w_err = rel_error(site.value, enc.decoded)
        for layer in site.layers:
            note = notes[layer]
            note.update(enc.note)
            note.update(bytes_before=before, bytes_after=after, graph_bytes=extra)
            note["weight_rel_error"] = w_err
            if layer in errors:
                note["rel_error"] = errors[layer]
        if errors:
            err = f"output rel. error {max(errors[layer] for layer in site.layers):.2e}"
        else:
            err = f"weight rel. error {w_err:.2e} (no calibration data)"
        changes.append(
            f"{p.name} {site.label}: {enc.summary}, {before:,} -> {after:,} bytes "
            f"(storage, not latency), {err}"
        )
    size_after = model_bytes(model)
    changes.append(
        f"{p.name}: {len(done)} weight(s) {total_before:,} -> {total_after:,} bytes, "
        f"model {size_before:,} -> {size_after:,} bytes; {STORAGE_ONLY}"
    )
    logger.info("%s: %s", p.name, changes[-1])
    return PassResult(model, True, changes, dict(notes))


def _take_over(model: Model, site: WeightSite, decoded: Tensor) -> None:
    """Rewires the readers to `decoded`, which takes over the float weight's name (the
    float weight, now unread, is renamed and dropped by cleanup)."""
    site.rewire(decoded)
    if decoded is site.tensor:
        return
    name = site.tensor.name
    site.tensor.name = model.unique_name(f"{name}_float")
    decoded.name = name
