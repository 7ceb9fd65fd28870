"""MACs and parameters of every weighted layer, counted from the graph (`source="exact"`).

Unlike :mod:`tailor.ir.layers`, which sees only layers whose weight is a float constant,
this view also finds layers whose weight a decode subgraph computes from constants (the
DequantizeLinear, Cast/Sub/Mul, bit-unpacking and codebook Gather encodings of
`quantize_weights`, `prune_weights`, `cluster_weights` and the QDQ weights of `quantize`),
and the integer layers of onnxruntime's quantizers (ConvInteger, MatMulInteger,
QLinearConv, QLinearMatMul). A weight's shape then comes from shape inference, not from
its value, so a compressed layer counts the same MACs and parameters as the float one.

MAC formulas (every shape includes the batch):

- Conv (and ConvInteger, QLinearConv): `|output| * C_in/group * prod(kernel)`.
- ConvTranspose: `|input| * C_out/group * prod(kernel)`.
- Gemm: `rows * K * N`.
- MatMul (and MatMulInteger, QLinearMatMul): `|output| * K`.

Parameters are the weight's elements plus the bias's. The integer layers of dynamic
quantization add their bias after the layer (Cast, Mul by the scales, Add): that Add's
constant is counted as the layer's bias, so the count matches the float layer's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from tailor.cost_models.base import Estimate
from tailor.cost_models.memory import (
    constant_derived,
    ensure_shapes,
    is_empty,
    resolve_batch,
    topological_order,
)
from tailor.errors import DynamicShapeError
from tailor.ir.model import Model, Node, Tensor

__all__ = [
    "COST_LAYER_OPS",
    "WeightedLayer",
    "weighted_layers",
    "layer_macs",
    "model_macs",
]

logger = logging.getLogger(__name__)

#: Op type -> the inputs that may hold the weight, in the order they are tried.
_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (1,),
    "MatMul": (1, 0),
    "ConvInteger": (1,),
    "MatMulInteger": (1, 0),
    "QLinearConv": (3,),
    "QLinearMatMul": (3, 0),
}
#: The ops of :data:`tailor.ir.layers.LAYER_OPS` plus onnxruntime's integer layers.
COST_LAYER_OPS: tuple[str, ...] = tuple(_WEIGHT_INPUTS)
_BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2, "QLinearConv": 8}
_INTEGER_OPS = ("ConvInteger", "MatMulInteger")
# Elementwise ops between an integer layer and its bias Add (dynamic quantization).
_EPILOGUE_OPS = ("Cast", "Mul", "Div", "Add")
_EPILOGUE_DEPTH = 4


@dataclass
class WeightedLayer:
    """One layer with a weight computed from constants only.

    Attributes:
        node: the layer's node.
        weight_index: which input is the weight.
        weight_shape: the weight's shape (from its value or from shape inference).
        data: the input activation (for MatMul-like ops, the non-weight operand).
        bias: the bias tensor, or None; for integer layers the constant of the Add that
            follows them.
        bias_size: elements of the bias (0 without one).
        decode: op types of the nodes computing the weight from stored constants, in
            topological order (empty when the weight is stored as it is).
        scales: constants an integer layer's output is rescaled by (dynamic
            quantization's weight scales), read after the layer.
    """

    node: Node
    weight_index: int
    weight_shape: tuple[int, ...]
    data: Tensor
    bias: Tensor | None = None
    bias_size: int = 0
    decode: list[str] = field(default_factory=list)
    scales: list[Tensor] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def weight(self) -> Tensor:
        return self.node.inputs[self.weight_index]

    @property
    def output(self) -> Tensor:
        return self.node.outputs[0]

    @property
    def params(self) -> int:
        return math.prod(self.weight_shape) + self.bias_size

    def macs(self, model: Model, batch: int = 1) -> int:
        """MACs of one run with `batch` samples (symbolic leading dims set to `batch`).

        Raises:
            DynamicShapeError: a needed activation shape is not static.
        """
        w, op = self.weight_shape, self.op
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            return math.prod(_static(model, self.output, batch)) * math.prod(w[1:])
        if op == "ConvTranspose":
            return math.prod(_static(model, self.data, batch)) * math.prod(w[1:])
        if op == "Gemm":
            x = _static(model, self.data, batch)
            rows = x[1] if int(self.node.attrs.get("transA", 0)) else x[0]
            return rows * math.prod(w)
        # MatMul-like: x @ W contracts W's rows, W @ x its columns.
        k = w[-2] if self.weight_index == _WEIGHT_INPUTS[op][0] else w[-1]
        return math.prod(_static(model, self.output, batch)) * k


def _static(model: Model, t: Tensor, batch: int) -> tuple[int, ...]:
    return model.static_shape(t, batch=batch)


def _known_shape(model: Model, t: Tensor) -> tuple[int, ...] | None:
    """A constant-derived tensor's shape if every dim is a known int."""
    shape = model.shape(t)
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


# ---------------------------------------------------------------------- the layer view
def weighted_layers(model: Model) -> list[WeightedLayer]:
    """Every Conv, ConvTranspose, Gemm, MatMul and integer layer whose weight (rank >= 2)
    is a constant or computed from constants only, in topological order.

    Runs shape inference first when tensors lack shapes.
    """
    ensure_shapes(model)
    order = topological_order(model)
    derived = constant_derived(model, order)
    producer = {t.name: n for n in order for t in n.outputs}
    out = []
    for node in order:
        if node.op not in _WEIGHT_INPUTS or node.outputs[0].name in derived:
            continue  # not a layer, or itself part of a constant computation
        for widx in _WEIGHT_INPUTS[node.op]:
            if widx >= len(node.inputs) or node.inputs[widx].name not in derived:
                continue
            shape = _known_shape(model, node.inputs[widx])
            if shape is None or len(shape) < 2:
                continue
            out.append(_describe(model, node, widx, shape, derived, producer))
            break
    return out


def _describe(
    model: Model,
    node: Node,
    widx: int,
    shape: tuple[int, ...],
    derived: set[str],
    producer: dict[str, Node],
) -> WeightedLayer:
    candidates = _WEIGHT_INPUTS[node.op]
    if len(candidates) > 1:  # MatMul-like: the other operand is the data
        data = node.inputs[candidates[1] if widx == candidates[0] else candidates[0]]
    else:
        data = node.inputs[0]
    layer = WeightedLayer(node, widx, shape, data)
    bidx = _BIAS_INPUT.get(node.op)
    if bidx is not None and len(node.inputs) > bidx and not is_empty(node.inputs[bidx]):
        layer.bias = node.inputs[bidx]
    elif node.op in _INTEGER_OPS:
        cout = _out_channels(node, widx, shape)
        layer.bias, layer.scales = _epilogue(model, node, cout, derived, producer)
    if layer.bias is not None:
        bshape = _known_shape(model, layer.bias)
        layer.bias_size = math.prod(bshape) if bshape is not None else 0
    layer.decode = _decode_ops(node.inputs[widx], producer)
    return layer


def _out_channels(node: Node, widx: int, shape: tuple[int, ...]) -> int:
    if node.op in ("Conv", "ConvInteger", "QLinearConv"):
        return shape[0]
    if node.op == "ConvTranspose":
        return shape[1] * int(node.attrs.get("group", 1))
    if node.op == "Gemm":
        return shape[0] if int(node.attrs.get("transB", 0)) else shape[1]
    return shape[-1] if widx == _WEIGHT_INPUTS[node.op][0] else shape[-2]


def _epilogue(
    model: Model, node: Node, cout: int, derived: set[str], producer: dict[str, Node]
) -> tuple[Tensor | None, list[Tensor]]:
    """The bias and scale constants that dynamic quantization puts after an integer
    layer (ConvInteger -> Cast -> Mul(input scale x weight scale) -> Add(bias)).

    Returns:
        The Add's constant if it has `cout` elements (else None), and the constants the
        Mul/Div steps read, directly or through a Mul with the run-time input scale.
    """
    scales: list[Tensor] = []
    t = node.outputs[0]
    for _ in range(_EPILOGUE_DEPTH):
        readers = model.consumers(t)
        if len(readers) != 1 or model.is_graph_output(t) or readers[0].op not in _EPILOGUE_OPS:
            break
        step = readers[0]
        other = next((x for x in step.inputs if x is not t), None)
        if step.op == "Add":
            if other is not None and other.name in derived:
                shape = _known_shape(model, other)
                if shape is not None and math.prod(shape) == cout:
                    return other, scales
            break
        if step.op in ("Mul", "Div") and other is not None:
            if other.name in derived:
                scales.append(other)
            elif (p := producer.get(other.name)) is not None and p.op == "Mul":
                scales.extend(x for x in p.inputs if x.name in derived)
        t = step.outputs[0]
    return None, scales


def _decode_ops(weight: Tensor, producer: dict[str, Node]) -> list[str]:
    """Op types of the constant-only subgraph computing `weight`, upstream first."""
    seen: dict[int, Node] = {}
    stack = [weight]
    while stack:
        t = stack.pop()
        node = producer.get(t.name)
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(node.inputs)
    return [n.op for n in reversed(list(seen.values())) if n.op != "Constant"]


# ---------------------------------------------------------------------- estimates
def _note(layer: WeightedLayer) -> str:
    if layer.op in _INTEGER_OPS or layer.op.startswith("QLinear"):
        return f"integer arithmetic ({layer.op})"
    if layer.decode:
        ops = "/".join(dict.fromkeys(layer.decode))
        return f"weight decoded from stored constants by {ops}; counted as the float layer"
    return ""


def layer_macs(model: Model, batch: int = 1) -> dict[str, dict[str, Estimate]]:
    """MACs and parameters of each weighted layer, keyed by node name (topological order).

    Args:
        model: the model; shapes are inferred if missing.
        batch: samples per run; replaces a symbolic leading (batch) dimension. A model
            exported with a fixed batch keeps its own.

    Returns:
        `{name: {"macs": Estimate(unit="MAC"), "params": Estimate(unit="params")}}`,
        both `source="exact"`.

    Raises:
        DynamicShapeError: an activation shape other than the batch is not static.
    """
    model = resolve_batch(model, batch)
    out = {}
    for layer in weighted_layers(model):
        try:
            macs = layer.macs(model, batch)
        except DynamicShapeError as e:
            raise DynamicShapeError(f"cannot count the MACs of {layer.name!r}: {e}") from e
        note = _note(layer)
        out[layer.name] = {
            "macs": Estimate(float(macs), "MAC", "exact", note),
            "params": Estimate(float(layer.params), "params", "exact", note),
        }
    return out


def model_macs(model: Model, batch: int = 1) -> dict[str, Estimate]:
    """Total MACs and parameters: the sums over :func:`layer_macs`.

    Returns:
        `{"macs": Estimate, "params": Estimate}` (`source="exact"`). Only weighted layers
        count: pooling, elementwise ops and normalisation left unfused add neither.
    """
    per_layer = layer_macs(model, batch)
    note = f"sum over {len(per_layer)} weighted layers (Conv/Gemm/MatMul and integer variants)"
    return {
        key: Estimate(float(sum(m[key].value for m in per_layer.values())), unit, "exact", note)
        for key, unit in (("macs", "MAC"), ("params", "params"))
    }
