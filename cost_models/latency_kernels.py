"""Splits a model into the units a runtime executes as one call ("kernels", as nn-Meter
calls them): each weighted node with the nodes onnxruntime fuses into it, every other
node on its own; and describes each unit (shapes, MACs, bytes, fused ops) as plain data
for the latency models (:mod:`.latency_features` turns it into a feature vector).

Grouping rules (what onnxruntime's CPU provider does at `ORT_ENABLE_ALL`):

- An **anchor** is a compute node: Conv, ConvTranspose, Gemm, MatMul, or an integer form
  (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger).
- **Backward**, an anchor takes the DequantizeLinear nodes that feed only it (QDQ weights,
  biases and activations: onnxruntime turns DQ -> Conv -> Q into one QLinearConv) and the
  DynamicQuantizeLinear and scale products that feed only it (dynamic quantization).
- **Forward**, it takes a chain of single-consumer nodes: BatchNormalization, a bias or
  scale (Add/Sub/Mul/Div with a constant or broadcast operand), one residual Add (float
  Conv only, when the other operand is computed before the Conv: onnxruntime's fused
  conv adds a `Sum` input), an activation (Relu, Clip,
  Sigmoid, Tanh, LeakyRelu, HardSigmoid), the Cast of an integer result, and finally the
  QuantizeLinear of a QDQ layer.
- Nodes whose inputs are all constant are folded at load and belong to no kernel (except
  DequantizeLinear, which onnxruntime keeps for its QDQ fusions); Identity and Dropout are
  removed at load too. Every other node is a kernel of its own.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tailor.errors import DynamicShapeError
from tailor.ir.model import Constant, Model, Node, Tensor

__all__ = ["Kernel", "ANCHOR_OPS", "ACTIVATIONS", "KINDS", "kernels"]

logger = logging.getLogger(__name__)

ANCHOR_OPS = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
)
_INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
_CONV_OPS = {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger"}
ACTIVATIONS = {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid"}
_AFFINE = {"Add", "Sub", "Mul", "Div"}
_REMOVED = {"Identity", "Dropout", "Constant"}
# Producers an anchor may take backward when everything they compute is its own.
_CLAIMABLE = {"DequantizeLinear", "DynamicQuantizeLinear", "Mul", "Cast", "Reshape", "Unsqueeze"}

_KINDS = {
    "pool": {"MaxPool", "AveragePool", "LpPool"},
    "global_pool": {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceSum"},
    "memory": {
        "Concat",
        "Split",
        "Slice",
        "Transpose",
        "Pad",
        "Tile",
        "Expand",
        "Gather",
        "Resize",
    },
    "reshape": {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Size"},
    "softmax": {"Softmax", "LogSoftmax"},
    "quantize": {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"},
}
KINDS = ("conv", "gemm", "elementwise", *_KINDS)


@dataclass
class Kernel:
    """One unit of execution and what determines its cost (batch 1, plain data).

    Attributes:
        name: the anchor's node name (the node's own name for a lone node).
        op: the anchor's op type.
        kind: `conv`, `gemm`, `elementwise`, `pool`, `global_pool`, `memory`, `reshape`,
            `softmax`, `quantize`.
        nodes: every node in the kernel, the anchor first.
        fused: op types of the nodes fused into the anchor (`BatchNormalization`, `Relu`,
            `Add:residual`, `QuantizeLinear`, ...).
        dtype: `int8` when the anchor computes on quantized values, else `float32`.
        input_shapes: shapes of the activations it reads (constants excluded).
        output_shapes: shapes of the activations it writes.
        cin, cout: input and output channels (features for Gemm/MatMul); 0 if none.
        kernel_size, strides, dilations: spatial attributes of convs and pools.
        groups: convolution groups.
        gemm: (M, K, N) of the matrix product the anchor amounts to (im2col for convs).
        macs: multiply-accumulates (anchors); element operations for other kernels.
        weight_bytes: bytes of the constants it reads.
        activation_bytes: bytes of activations read and written.
        qdq_fanout: for a QDQ anchor, how many nodes read the quantized activation it
            takes (with int8 activations and more than one reader, onnxruntime on x86
            cannot turn it into an integer kernel).
        activation_dtype: for an integer anchor, the type of its quantized input
            (`int8`, `uint8`); empty otherwise.
        runtime_ops: the nodes onnxruntime's optimizer on this machine makes of the
            kernel (`QLinearConv`, `Conv@nchwc`, `ReorderInput@nchwc`, ...), filled by
            :func:`tailor.cost_models.latency_measure.annotate`; empty until then.
    """

    name: str
    op: str
    kind: str
    nodes: list[str]
    fused: list[str] = field(default_factory=list)
    dtype: str = "float32"
    input_shapes: list[list[int]] = field(default_factory=list)
    output_shapes: list[list[int]] = field(default_factory=list)
    cin: int = 0
    cout: int = 0
    kernel_size: list[int] = field(default_factory=list)
    strides: list[int] = field(default_factory=list)
    dilations: list[int] = field(default_factory=list)
    groups: int = 1
    gemm: list[int] = field(default_factory=lambda: [0, 0, 0])
    macs: int = 0
    weight_bytes: int = 0
    activation_bytes: int = 0
    qdq_fanout: int = 0
    activation_dtype: str = ""
    runtime_ops: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Kernel:
        return cls(**data)


def _shape(model: Model, t: Tensor) -> tuple[int, ...] | None:
    if isinstance(t, Constant):
        return tuple(int(d) for d in t.shape)
    try:
        return model.static_shape(t, batch=1)
    except DynamicShapeError:
        return None


def _numel(shape: tuple[int, ...] | None) -> int:
    return 0 if shape is None else math.prod(shape)


def _itemsize(t: Tensor) -> int:
    try:
        return np.dtype(t.dtype).itemsize if t.dtype is not None else 4
    except TypeError:
        return 4


def _inputs(node: Node) -> list[Tensor]:
    """The node's inputs, without the empty names of omitted optional inputs."""
    return [t for t in node.inputs if t.name]


class _Grouper:
    """One pass over the graph: constant propagation, then anchors, then the rest."""

    def __init__(self, model: Model):
        self.model = model
        self.constant: set[str] = set()
        self.owner: dict[str, int] = {}  # node name -> kernel index
        self.groups: list[list[Node]] = []
        self.fused: list[list[str]] = []
        self.position = {n.name: i for i, n in enumerate(model.nodes)}
        for node in model.nodes:
            ins = _inputs(node)
            # onnxruntime folds what depends on constants only, but keeps DequantizeLinear
            # of constant weights: its QDQ fusions need them.
            if node.op == "Constant" or (
                ins and node.op != "DequantizeLinear" and all(self._const(t) for t in ins)
            ):
                self.constant.update(t.name for t in node.outputs)

    def _const(self, t: Tensor) -> bool:
        return isinstance(t, Constant) or t.name in self.constant

    def folded(self, node: Node) -> bool:
        if node.op in _REMOVED:
            return True
        return all(t.name in self.constant for t in node.outputs)

    def _small(self, t: Tensor, ref: Tensor) -> bool:
        """A constant, or an operand that broadcasts over `ref` (a bias or a scale)."""
        if self._const(t):
            return True
        shape, full = _shape(self.model, t), _shape(self.model, ref)
        if shape is None or full is None:
            return False
        return _numel(shape) < _numel(full) or len(shape) < len(full)

    def _claim(self, node: Node, index: int, label: str | None = None) -> None:
        self.owner[node.name] = index
        self.groups[index].append(node)
        if label:
            self.fused[index].append(label)

    def anchor(self, node: Node) -> None:
        index = len(self.groups)
        self.groups.append([])
        self.fused.append([])
        self._claim(node, index)
        qdq = any(
            (p := self.model.producer(t)) is not None and p.op == "DequantizeLinear"
            for t in _inputs(node)
        )
        residual = False
        out = node.outputs[0]
        while True:
            users = self.model.consumers(out)
            if len(users) != 1 or self.model.is_graph_output(out):
                break
            nxt = users[0]
            if nxt.name in self.owner or self.folded(nxt):
                break
            others = [t for t in _inputs(nxt) if t is not out]
            label = nxt.op
            if nxt.op in ACTIVATIONS or nxt.op == "BatchNormalization":
                pass
            elif nxt.op == "Cast" and node.op in _INTEGER_OPS:
                pass
            elif nxt.op in _AFFINE and len(others) == 1 and self._small(others[0], out):
                pass
            elif (
                nxt.op == "Add"
                and node.op == "Conv"
                and not qdq
                and not residual
                and len(others) == 1
                and _shape(self.model, others[0]) == _shape(self.model, out)
                and self._ready_before(others[0], node)
            ):
                residual, label = True, "Add:residual"
            elif nxt.op == "QuantizeLinear" and qdq:
                self._claim(nxt, index, label)
                break
            else:
                break
            self._claim(nxt, index, label)
            out = nxt.outputs[0]
        self._closure(index)

    def _ready_before(self, t: Tensor, node: Node) -> bool:
        """Whether `t` is computed before `node` runs: a fused conv can only add a sum
        input that already exists (so of two convs meeting at an Add, the later takes it)."""
        p = self.model.producer(t)
        return p is None or self.position[p.name] < self.position[node.name]

    def _closure(self, index: int) -> None:
        """Claims producers whose every output is read inside the kernel (QDQ and dynamic
        quantization bookkeeping)."""
        changed = True
        while changed:
            changed = False
            members = {n.name for n in self.groups[index]}
            for member in list(self.groups[index]):
                for t in _inputs(member):
                    p = self.model.producer(t)
                    if p is None or p.name in self.owner or self.folded(p):
                        continue
                    if p.op not in _CLAIMABLE:
                        continue
                    readers = [c for o in p.outputs for c in self.model.consumers(o)]
                    if not readers or any(c.name not in members for c in readers):
                        continue
                    if any(self.model.is_graph_output(o) for o in p.outputs):
                        continue
                    if p.op not in ("DequantizeLinear", "DynamicQuantizeLinear") and not all(
                        self._const(i) or _numel(_shape(self.model, i)) <= 1 for i in _inputs(p)
                    ):
                        continue
                    self._claim(p, index, p.op)
                    changed = True
                    members.add(p.name)

    def run(self) -> list[list[Node]]:
        for node in self.model.nodes:
            if node.op in ANCHOR_OPS and node.name not in self.owner and not self.folded(node):
                self.anchor(node)
        for node in self.model.nodes:
            if node.name not in self.owner and not self.folded(node):
                self.owner[node.name] = len(self.groups)
                self.groups.append([node])
                self.fused.append([])
        order = {n.name: i for i, n in enumerate(self.model.nodes)}
        # Kernels in the order of their anchors (weight DequantizeLinear nodes of a QDQ
        # model all come first in the file).
        ranked = sorted(range(len(self.groups)), key=lambda i: order[self.groups[i][0].name])
        self.groups = [self.groups[i] for i in ranked]
        self.fused = [self.fused[i] for i in ranked]
        return self.groups


def _kind(op: str) -> str:
    if op in _CONV_OPS:
        return "conv"
    if op in ANCHOR_OPS:
        return "gemm"
    for kind, ops in _KINDS.items():
        if op in ops:
            return kind
    return "elementwise"


def _describe(g: _Grouper, nodes: list[Node], fused: list[str]) -> Kernel:
    model = g.model
    anchor = nodes[0]
    members = {n.name for n in nodes}
    ins: dict[str, Tensor] = {}
    consts: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}
    for n in nodes:
        for t in _inputs(n):
            p = model.producer(t)
            if g._const(t):
                consts[t.name] = t
            elif p is None or p.name not in members:
                ins[t.name] = t
        for t in n.outputs:
            readers = model.consumers(t)
            if model.is_graph_output(t) or any(c.name not in members for c in readers):
                outs[t.name] = t
    in_shapes = [_shape(model, t) for t in ins.values()]
    out_shapes = [_shape(model, t) for t in outs.values()]
    act_bytes = sum(_numel(s) * _itemsize(t) for s, t in zip(in_shapes, ins.values(), strict=True))
    act_bytes += sum(
        _numel(s) * _itemsize(t) for s, t in zip(out_shapes, outs.values(), strict=True)
    )
    weight_bytes = 0
    for t in consts.values():
        value = model.constant_value(t)
        weight_bytes += int(value.nbytes) if value is not None else _numel(_shape(model, t)) * 4
    k = Kernel(
        name=anchor.name,
        op=anchor.op,
        kind=_kind(anchor.op),
        nodes=[n.name for n in nodes],
        fused=list(fused),
        input_shapes=[list(s) if s is not None else [] for s in in_shapes],
        output_shapes=[list(s) if s is not None else [] for s in out_shapes],
        weight_bytes=int(weight_bytes),
        activation_bytes=int(act_bytes),
    )
    quantized = anchor.op in _INTEGER_OPS or any(
        n.op in ("DequantizeLinear", "DynamicQuantizeLinear") for n in nodes[1:]
    )
    if anchor.op in ANCHOR_OPS and quantized:
        k.dtype = "int8"
    if k.kind in ("conv", "gemm"):
        _anchor_geometry(g, anchor, k)
    else:
        _other_geometry(model, anchor, k)
    return k


def _weight_shape(g: _Grouper, anchor: Node) -> tuple[int, ...] | None:
    index = {"QLinearConv": 3, "QLinearMatMul": 3}.get(anchor.op, 1)
    ins = anchor.inputs
    return _shape(g.model, ins[index]) if len(ins) > index else None


def _anchor_geometry(g: _Grouper, anchor: Node, k: Kernel) -> None:
    model = g.model
    w = _weight_shape(g, anchor)
    y = _shape(model, anchor.outputs[0])
    x = _shape(model, anchor.inputs[0])
    attrs = anchor.attrs
    if k.kind == "conv" and w is not None and y is not None and len(w) >= 3:
        groups = int(attrs.get("group", 1))
        spatial = list(w[2:])
        if anchor.op == "ConvTranspose":
            cin, cout = w[0], w[1] * groups
            macs = _numel(x[1:] if x else None) * w[1] * math.prod(spatial)
        else:
            cout, cin = w[0], w[1] * groups
            macs = _numel(y[1:]) * w[1] * math.prod(spatial)
        out_spatial = math.prod(y[2:]) if len(y) > 2 else 1
        k.cin, k.cout, k.groups, k.kernel_size = int(cin), int(cout), groups, spatial
        k.strides = [int(s) for s in attrs.get("strides", [1] * len(spatial))]
        k.dilations = [int(d) for d in attrs.get("dilations", [1] * len(spatial))]
        k.gemm = [int(out_spatial), int(cin // groups * math.prod(spatial)), int(cout // groups)]
        k.macs = int(macs)
        return
    # Gemm / MatMul (and integer forms): rows x inner x columns from the output and weight.
    if y is None or not y:
        return
    if x and len(x) >= 2:
        inner = x[0] if anchor.op == "Gemm" and int(attrs.get("transA", 0)) else x[-1]
    else:
        inner = w[-2] if w is not None and len(w) >= 2 else 0
    cols = y[-1]
    rows = _numel(y) // max(1, cols)
    k.cin, k.cout = int(inner), int(cols)
    k.gemm = [int(rows), int(inner), int(cols)]
    k.macs = int(rows * inner * cols)


def _other_geometry(model: Model, node: Node, k: Kernel) -> None:
    attrs = node.attrs
    x = [s for s in k.input_shapes if s]
    y = [s for s in k.output_shapes if s]
    in_elems = sum(math.prod(s) for s in x)
    out_elems = sum(math.prod(s) for s in y)
    if x and len(x[0]) > 1:
        k.cin = int(x[0][1])
    if y and len(y[0]) > 1:
        k.cout = int(y[0][1])
    if k.kind == "pool":
        k.kernel_size = [int(v) for v in attrs.get("kernel_shape", [])]
        k.strides = [int(v) for v in attrs.get("strides", [1] * len(k.kernel_size))]
        k.macs = int(out_elems * max(1, math.prod(k.kernel_size)))
    elif k.kind == "global_pool":
        k.macs = int(in_elems)
    else:
        k.macs = int(max(in_elems, out_elems))


def kernels(model: Model) -> list[Kernel]:
    """The model's kernels in execution order (shapes are inferred on a copy if missing).

    Raises:
        UnsupportedModelError: shape inference fails.
    """
    if any(t.shape is None for n in model.nodes for t in n.outputs if t.name):
        model = model.copy().infer_shapes()
    g = _Grouper(model)
    groups = g.run()
    out = []
    for nodes, fused in zip(groups, g.fused, strict=True):
        out.append(_describe(g, nodes, fused))
    by_name = {n.name: n for n in model.nodes}
    for k in out:
        if k.dtype == "int8":
            k.qdq_fanout, k.activation_dtype = _quantized_input(model, by_name[k.nodes[0]])
    return out


def _quantized_input(model: Model, anchor: Node) -> tuple[int, str]:
    """(readers, element type) of the quantized activation behind the anchor's input."""
    x = anchor.inputs[0]
    p = model.producer(x)
    if p is None or p.op != "DequantizeLinear":
        return 1, _dtype_name(x)  # an integer op reads the quantized tensor itself
    quantized = p.inputs[0]
    q = model.producer(quantized)
    if q is None:
        return len(model.consumers(p.outputs[0])), _dtype_name(quantized)
    readers = sum(
        len(model.consumers(dq.outputs[0])) if dq.op == "DequantizeLinear" else 1
        for dq in model.consumers(q.outputs[0])
    )
    return readers, _dtype_name(quantized)


def _dtype_name(t: Tensor) -> str:
    try:
        return np.dtype(t.dtype).name if t.dtype is not None else ""
    except TypeError:
        return ""
