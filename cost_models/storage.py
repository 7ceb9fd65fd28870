"""Storage: the exact bytes of a model file and of the constants each layer reads
(`source="exact"`).

A model's storage is what it takes on disk: the serialized `.onnx` plus every external
data file it references. A layer's storage is the bytes of the constants it reads: its
weight and bias, and, when a storage pass re-encoded them (docs/storage_formats.md),
the constants of the decode subgraph instead: int8 codes and scales behind a
DequantizeLinear, packed codes behind Cast/Div/Mod, a bit mask and values behind
CumSum/Gather, a codebook and indices behind Gather. They are found by walking the
constant-only producers upstream of each of the layer's inputs. A constant several
layers read (a shared codebook, the small shape constants the passes share) is counted
once, at the first layer in topological order, so the layers' bytes add up without
double counting.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from tailor.cost_models.base import Estimate
from tailor.cost_models.macs import weighted_layers
from tailor.cost_models.memory import constant_derived, topological_order
from tailor.errors import ModelLoadError
from tailor.ir.model import Constant, Model, Node, Tensor

__all__ = ["model_storage", "layer_storage", "constant_bytes"]

logger = logging.getLogger(__name__)

ModelOrPath = Model | str | os.PathLike | bytes | onnx.ModelProto


def model_storage(model: ModelOrPath) -> Estimate:
    """Exact bytes the model takes on disk.

    Args:
        model: a path to an `.onnx` file (its size plus the size of every distinct
            external data file it references), serialized bytes, a ModelProto or a
            :class:`Model` (the size of its serialization, all weights inline).

    Raises:
        ModelLoadError: the file, or an external data file it names, is missing.
    """
    if isinstance(model, Model):
        return Estimate(float(model.to_proto().ByteSize()), "B", "exact", "serialized in memory")
    if isinstance(model, (bytes, bytearray, memoryview)):
        return Estimate(float(len(model)), "B", "exact", "serialized bytes")
    if isinstance(model, onnx.ModelProto):
        note = "serialized in memory"
        if _external_locations(model):
            note += "; external data files not included (give the model's path)"
        return Estimate(float(model.ByteSize()), "B", "exact", note)
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, RuntimeError, ...
        raise ModelLoadError(f"{path} is not an ONNX model: {e}") from e
    total = path.stat().st_size
    locations = _external_locations(proto)
    for location in locations:
        data = path.parent / location
        if not data.is_file():
            raise ModelLoadError(f"{path}: external data file {location!r} is missing")
        total += data.stat().st_size
    note = f"{path.name}"
    if locations:
        note += f" + {len(locations)} external data file(s): {', '.join(sorted(locations))}"
    return Estimate(float(total), "B", "exact", note)


def _external_locations(proto: onnx.ModelProto) -> set[str]:
    found = set()
    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            found.add(os.path.normpath(info.get("location", "")))
    return found


def _nbytes(model: Model, t: Tensor) -> int:
    """Stored bytes of a constant: an initializer, or a Constant node's value."""
    if isinstance(t, Constant):
        return int(np.asarray(t.values).nbytes)
    value = model.constant_value(t)
    return 0 if value is None else int(value.nbytes)


def _stored_constants(
    model: Model, roots: list[Tensor], derived: set[str], producer: dict[str, Node]
) -> list[Tensor]:
    """The stored constants (initializers, Constant node outputs) the constant-only
    subgraphs computing `roots` read, each once."""
    found: dict[str, Tensor] = {}
    visited: set[str] = set()
    stack = [t for t in roots if t.name in derived]
    while stack:
        t = stack.pop()
        if t.name in visited:
            continue
        visited.add(t.name)
        node = producer.get(t.name)
        if node is None or node.op == "Constant":
            found[t.name] = t
            continue
        stack.extend(x for x in node.inputs if x.name in derived)
    return list(found.values())


def layer_storage(model: Model) -> dict[str, Estimate]:
    """Bytes of the constants each weighted layer reads, keyed by node name.

    Counts the weight, bias and other constant inputs (zero points and scales of integer
    layers), or the constants their decode subgraphs read; for the integer layers of
    dynamic quantization also the weight scales and the bias constant of the Mul and Add
    after them. Decode nodes'
    own protobuf bytes and shared constants already counted at an earlier layer are
    left out (the note gives the shared bytes). Constants no layer reads (unfused
    normalisation, activation quantization scales, shape constants) are in
    :func:`constant_bytes` but no layer's figure.
    """
    layers = weighted_layers(model)
    order = topological_order(model)
    derived = constant_derived(model, order)
    producer = {t.name: n for n in order for t in n.outputs}
    claimed: dict[str, str] = {}
    out = {}
    for layer in layers:
        roots = [layer.node.inputs[i] for i in range(len(layer.node.inputs))]
        roots = [t for t in roots if t is not layer.data]
        if layer.bias is not None:
            roots.append(layer.bias)
        roots += layer.scales
        own = shared = 0
        kinds = set()
        for t in _stored_constants(model, roots, derived, producer):
            n = _nbytes(model, t)
            if t.name in claimed:
                shared += n
                continue
            claimed[t.name] = layer.name
            own += n
            value = model.constant_value(t)
            if value is not None:
                kinds.add(str(value.dtype))
        parts = []
        if layer.decode:
            parts.append(f"decoded by {'/'.join(dict.fromkeys(layer.decode))}")
        if kinds:
            parts.append("stored as " + ", ".join(sorted(kinds)))
        if shared:
            parts.append(f"{shared:,} bytes shared with earlier layers not counted")
        out[layer.name] = Estimate(float(own), "B", "exact", "; ".join(parts))
    return out


def constant_bytes(model: Model) -> Estimate:
    """Bytes of every stored constant (initializers and Constant nodes) in the graph,
    whether or not a layer reads it."""
    order = topological_order(model)
    producer = {t.name: n for n in order for t in n.outputs}
    total = 0
    for name, t in model.tensors().items():
        node = producer.get(name)
        if isinstance(t, Constant) or (node is not None and node.op == "Constant"):
            total += _nbytes(model, t)
    return Estimate(float(total), "B", "exact", "initializers and Constant nodes, unencoded")
