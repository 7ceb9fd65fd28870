"""The layer view: every Conv, ConvTranspose, Gemm and MatMul with a constant weight, with
its shapes, parameters, MACs and weight bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tailor.errors import DynamicShapeError
from tailor.ir.model import Constant, Model, Node

__all__ = [
    "Layer",
    "LAYER_OPS",
    "is_layer_node",
    "layer_weight",
    "layers",
    "ModelSummary",
    "summarize",
]

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Layer:
    """One weighted layer.

    Shapes have the batch dimension set to 1; MACs and activations are per sample.
    `in_channels`/`out_channels` are the weight's input and output feature counts.
    """

    index: int
    name: str
    op: str
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray | None = field(repr=False)
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    groups: int
    params: int
    macs: int | None
    weight_bytes: int
    node: Node = field(repr=False, compare=False)

    @property
    def is_depthwise(self) -> bool:
        return self.op == "Conv" and self.groups > 1 and self.groups == self.in_channels

    def as_dict(self) -> dict:
        """Plain data for `--json` and reports."""
        return {
            "index": self.index,
            "name": self.name,
            "op": self.op,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "output_shape": list(self.output_shape) if self.output_shape else None,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel": list(self.kernel),
            "groups": self.groups,
            "params": self.params,
            "macs": self.macs,
            "weight_bytes": self.weight_bytes,
        }


def layer_weight(model: Model, node: Node) -> tuple[int, np.ndarray] | None:
    """(input index, value) of the node's constant weight, or None if it has none."""
    if node.op not in LAYER_OPS or len(node.inputs) < 2:
        return None
    candidates = [1, 0] if node.op == "MatMul" else [1]
    for i in candidates:
        value = model.constant_value(node.inputs[i])
        if value is not None and value.ndim >= 2 and np.issubdtype(value.dtype, np.floating):
            return i, value
    return None


def is_layer_node(model: Model, node: Node) -> bool:
    """Whether `node` is a weighted layer (op in LAYER_OPS with a constant weight)."""
    return layer_weight(model, node) is not None


def _static(model: Model, tensor) -> tuple[int, ...] | None:
    try:
        return model.static_shape(tensor, batch=1)
    except DynamicShapeError:
        return None


def _describe(model: Model, node: Node, index: int) -> Layer:
    widx, w = layer_weight(model, node)  # type: ignore[misc]
    attrs = node.attrs
    groups = int(attrs.get("group", 1))
    bias = None
    if node.op in ("Conv", "ConvTranspose") and len(node.inputs) > 2:
        bias = model.constant_value(node.inputs[2])
    elif node.op == "Gemm" and len(node.inputs) > 2:
        bias = model.constant_value(node.inputs[2])
    in_shape = _static(model, node.inputs[1 - widx if node.op == "MatMul" else 0])
    out_shape = _static(model, node.outputs[0])
    kernel: tuple[int, ...] = ()
    if node.op == "Conv":
        cout, cin = w.shape[0], w.shape[1] * groups
        kernel = tuple(int(k) for k in w.shape[2:])
        macs = (
            None if out_shape is None else math.prod(out_shape[1:]) * w.shape[1] * math.prod(kernel)
        )
    elif node.op == "ConvTranspose":
        cin, cout = w.shape[0], w.shape[1] * groups
        kernel = tuple(int(k) for k in w.shape[2:])
        macs = (
            None if in_shape is None else math.prod(in_shape[1:]) * w.shape[1] * math.prod(kernel)
        )
    elif node.op == "Gemm":
        wt = w.T if attrs.get("transB", 0) else w
        cin, cout = wt.shape
        rows = 1 if in_shape is None else (in_shape[1] if attrs.get("transA", 0) else in_shape[0])
        macs = rows * cin * cout
    else:  # MatMul: x @ W (weight second) or W @ x (weight first)
        if widx == 1:
            cin, cout = w.shape[-2], w.shape[-1]
        else:
            cout, cin = w.shape[-2], w.shape[-1]
        macs = None if out_shape is None else math.prod(out_shape) * cin
    params = int(w.size + (bias.size if bias is not None else 0))
    nbytes = int(w.nbytes + (bias.nbytes if bias is not None else 0))
    return Layer(
        index=index,
        name=node.name,
        op=node.op,
        weight=w,
        bias=bias,
        input_shape=in_shape,
        output_shape=out_shape,
        in_channels=int(cin),
        out_channels=int(cout),
        kernel=kernel,
        groups=groups,
        params=params,
        macs=None if macs is None else int(macs),
        weight_bytes=nbytes,
        node=node,
    )


def layers(model: Model) -> list[Layer]:
    """The model's weighted layers in topological order (shapes must be inferred)."""
    out = []
    for node in model.nodes:
        if is_layer_node(model, node):
            out.append(_describe(model, node, len(out)))
    return out


@dataclass
class ModelSummary:
    """Whole-model totals for `tailor inspect`."""

    layers: list[Layer]
    nodes: int
    params: int
    weight_bytes: int
    macs: int | None
    ops: dict[str, int]

    def as_dict(self) -> dict:
        return {
            "nodes": self.nodes,
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "macs": self.macs,
            "ops": self.ops,
            "layers": [layer.as_dict() for layer in self.layers],
        }


def summarize(model: Model) -> ModelSummary:
    """Layers plus totals over every initializer (params and bytes) and every layer's MACs."""
    found = layers(model)
    params = weight_bytes = 0
    seen: set[int] = set()
    for t in model.tensors().values():
        if isinstance(t, Constant) and id(t) not in seen:
            seen.add(id(t))
            values = np.asarray(t.values)
            params += int(values.size)
            weight_bytes += int(values.nbytes)
    ops: dict[str, int] = {}
    for n in model.nodes:
        ops[n.op] = ops.get(n.op, 0) + 1
    macs = (
        None
        if any(layer.macs is None for layer in found)
        else sum(layer.macs or 0 for layer in found)
    )
    return ModelSummary(
        found, len(model.nodes), params, weight_bytes, macs, dict(sorted(ops.items()))
    )
