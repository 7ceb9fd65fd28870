"""Replaces nodes whose inputs are all constants (and shapes known statically) with
initializers holding their outputs.

Evaluation is onnx-graphsurgeon's `Graph.fold_constants` (onnxruntime underneath), with
three of its behaviours replaced: its shape folding ignores `Shape`'s `start`/`end` and
comes with a Cast elision that changes results (`Cast(Mul(Cast(3), 0.5))` folds to 0,
not 1), so shapes are folded here; and random generators are never folded. Quantize and
Dequantize stay (folding them would expand int8 weights back to float), as does any
result over `max_bytes`. Symbolic (batch) dimensions stay dynamic: only `Shape` results
whose selected dimensions are all static fold.
"""

from __future__ import annotations

import logging

import numpy as np
from onnx_graphsurgeon.logger import G_LOGGER

from tailor.ir.model import Model, Node
from tailor.passes.base import Param, Pass, PassContext, PassResult
from tailor.passes.registry import register
from tailor.passes.rewrite import refresh_shapes

__all__ = ["FoldConstants", "NEVER_FOLD"]

logger = logging.getLogger(__name__)

#: Ops whose results must stay computed at run time.
NEVER_FOLD = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Bernoulli",
        "Multinomial",
        "Dropout",
    }
)


def _static_dims(dims) -> bool:
    return all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims)


def _shape_value(model: Model, node: Node) -> np.ndarray | None:
    """The output of a Shape node when its selected dimensions are all static."""
    shape = model.shape(node.inputs[0])
    if shape is None:
        return None
    rank = len(shape)
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    dims = shape[
        slice(
            max(-rank, min(rank, start)), None if end is None else max(-rank, min(rank, int(end)))
        )
    ]
    return np.asarray(dims, np.int64) if _static_dims(dims) else None


def _shape_part(model: Model, node: Node) -> np.ndarray | None:
    """The output of Gather/Slice over a Shape whose picked dimensions are static."""
    src = node.inputs[0]
    shape_node = model.producer(src)
    if (
        shape_node is None
        or shape_node.op != "Shape"
        or "start" in shape_node.attrs
        or "end" in shape_node.attrs
    ):
        return None
    shape = model.shape(shape_node.inputs[0])
    if shape is None:
        return None
    dims = np.array([d if isinstance(d, (int, np.integer)) else -1 for d in shape], np.int64)
    consts = [model.constant_value(t) if not t.is_empty() else None for t in node.inputs[1:]]
    try:
        if (
            node.op == "Gather"
            and consts
            and consts[0] is not None
            and int(node.attrs.get("axis", 0)) == 0
        ):
            # A scalar index gives a numpy scalar; graphsurgeon Constants need an ndarray.
            picked = np.asarray(np.take(dims, consts[0].astype(np.int64)), np.int64)
        elif (
            node.op == "Slice"
            and model.opset >= 10
            and len(consts) >= 2
            and all(c is not None for c in consts)
        ):
            starts, ends = consts[0].reshape(-1), consts[1].reshape(-1)
            axes = consts[2].reshape(-1) if len(consts) > 2 else np.zeros(1, np.int64)
            steps = consts[3].reshape(-1) if len(consts) > 3 else np.ones(1, np.int64)
            if starts.size != 1 or int(axes[0]) not in (0, -1):
                return None
            # Python slicing clamps like ONNX Slice on a 1-D tensor.
            picked = dims[int(starts[0]) : int(ends[0]) : int(steps[0])]
        else:
            return None
    except (IndexError, ValueError):  # out-of-range index, zero step: leave it to run time
        return None
    return picked if picked.size == 0 or picked.min() >= 0 else None


@register
class FoldConstants(Pass):
    """Replaces nodes whose inputs are all constants with initializers holding their outputs.

    Also folds `Shape` (and `Gather`/`Slice` of a shape) where the dimensions read are
    static. Never folds Quantize/Dequantize, random generators, or results over
    `max_bytes`.
    """

    name = "fold_constants"
    lossless = True
    params = (
        Param(
            "max_bytes",
            "int",
            16 << 20,
            "largest folded tensor in bytes (bigger ones stay computed)",
            low=0,
        ),
    )

    def run(self, model: Model, context: PassContext) -> PassResult:
        refresh_shapes(model)
        before = {n.name: n.op for n in model.nodes}
        changes, reported = [], set()
        for node in list(model.nodes):
            if node.op not in ("Shape", "Gather", "Slice") or not self.selects(model, node):
                continue
            value = _shape_value(model, node) if node.op == "Shape" else _shape_part(model, node)
            if value is not None:
                out = node.outputs[0]
                out.to_constant(value)
                out.inputs.clear()
                changes.append(f"folded {node.op} {node.name} to the static shape {value.tolist()}")
                reported.add(node.name)
        model.toposort()
        severity = G_LOGGER.severity
        G_LOGGER.severity = G_LOGGER.ERROR  # graphsurgeon prints every skipped partition
        try:
            model.graph.fold_constants(
                fold_shapes=False,
                recurse_subgraphs=False,  # graphsurgeon drops should_exclude_node there
                partitioning="recursive",
                error_ok=True,
                size_threshold=self.config["max_bytes"],
                should_exclude_node=lambda n: n.op in NEVER_FOLD or not self.selects(model, n),
            )
        finally:
            G_LOGGER.severity = severity
        model.cleanup()
        after = {n.name for n in model.nodes}
        for name, op in before.items():
            if name not in after and name not in reported:
                verb = "lowered" if op == "Constant" else "folded"
                changes.append(f"{verb} {op} {name} into an initializer")
        return PassResult(model, bool(changes), changes)
