"""Chains of factor layers, the graph side of the low-rank passes: what replaces one
weighted layer (:class:`Factor`, :class:`Factorization`), what the chain costs in
parameters and MACs, and splicing it into the graph in the layer's place (the layer's
output tensor, and so every graph output name, is kept).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tailor.errors import DynamicShapeError
from tailor.ir.layers import layer_weight
from tailor.ir.model import Model, Node, Variable
from tailor.passes._lstsq import conv_geometry

__all__ = [
    "Factor",
    "Factorization",
    "build_chain",
    "chain_macs",
    "chain_params",
    "input_shape",
    "layer_as_factor",
    "replace_layer",
]

logger = logging.getLogger(__name__)


@dataclass
class Factor:
    """One layer of a replacement chain.

    Args:
        op: `Conv`, `Gemm` or `MatMul`.
        weight: its constant weight (float64; cast to the layer's dtype when spliced).
        attrs: its attributes.
        bias: a new constant, the name of an existing tensor (the original bias, reused
            as is), or None.
        weight_first: MatMul only, `W @ x` instead of `x @ W`.
        tag: suffix of the node's name.
    """

    op: str
    weight: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    bias: np.ndarray | str | None = None
    weight_first: bool = False
    tag: str = ""


@dataclass
class Factorization:
    """How one layer is replaced and what it costs.

    Args:
        factors: the chain, first factor reading the layer's data input, the last writing
            its output tensor.
        input_index: which input of the original node is the data input.
        ranks: the kept rank(s), by name (`rank`, or `in`/`out` for Tucker-2).
        full_ranks: the ranks at which the factorization is exact.
        params_before, params_after: weights and biases of the layer and of the chain.
        weight_rel_error: `||W - W'|| / ||W||`.
        extra: further notes (method, data-aware fit, ...).
        macs_before, macs_after: multiply-accumulates per sample of the layer and of the
            chain (filled in by the driver; None when the input shape is not static).
    """

    factors: list[Factor]
    input_index: int
    ranks: dict[str, int]
    full_ranks: dict[str, int]
    params_before: int
    params_after: int
    weight_rel_error: float
    extra: dict[str, Any] = field(default_factory=dict)
    macs_before: int | None = None
    macs_after: int | None = None

    def describe(self) -> str:
        if len(self.ranks) == 1:
            (key,) = self.ranks
            return f"rank {self.full_ranks[key]} -> {self.ranks[key]}"
        full = ", ".join(f"{k} {v}" for k, v in self.full_ranks.items())
        kept = ", ".join(str(v) for v in self.ranks.values())
        return f"ranks ({full}) -> ({kept})"


def chain_params(factors: Sequence[Factor], bias_size: int) -> int:
    """Parameters of a chain: every factor's weight, new biases, plus a reused bias."""
    total = bias_size
    for f in factors:
        total += int(f.weight.size)
        if isinstance(f.bias, np.ndarray):
            total += int(f.bias.size)
    return total


def layer_as_factor(model: Model, node: Node) -> Factor:
    """The original layer as a one-factor chain, to cost it like its replacement."""
    widx, w = layer_weight(model, node)  # type: ignore[misc]
    return Factor(node.op, w, dict(node.attrs), weight_first=node.op == "MatMul" and widx == 0)


def chain_macs(factors: Sequence[Factor], shape: Sequence[int | str] | None) -> int | None:
    """Multiply-accumulates per sample of a chain reading an input of `shape` (batch 1).

    Each factor costs its weight's size times the positions it is applied at: output
    pixels for a Conv (so a 1x1 factor before a strided core runs at the input's
    resolution), rows for Gemm and MatMul. None when the shape is not static.
    """
    if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    dims = [int(d) for d in shape]  # type: ignore[arg-type]
    spatial = dims[2:]
    total = 0
    for f in factors:
        if f.op == "Conv":
            spatial = conv_geometry(f.attrs, spatial, f.weight.shape[2:])[4]
            total += math.prod(spatial) * int(f.weight.size)
        elif f.op == "Gemm" or not f.weight_first:  # x @ W: every row but the last axis
            total += math.prod(dims[:-1]) * int(f.weight.size)
        else:  # W @ x: every column of the last axis, per leading index
            total += math.prod(dims[:-2]) * dims[-1] * int(f.weight.size)
    return total


def input_shape(model: Model, node: Node, index: int) -> list[int] | None:
    """The static shape (batch 1) of a layer's data input, or None."""
    try:
        return list(model.static_shape(node.inputs[index], batch=1))
    except DynamicShapeError:
        return None


def build_chain(
    model: Model,
    factors: Sequence[Factor],
    x: Variable,
    out: Variable,
    *,
    hint: str,
    dtype: Any,
) -> list[Node]:
    """Appends the chain `x -> factors... -> out` to `model` (call toposort afterwards)."""
    nodes: list[Node] = []
    h = x
    for i, f in enumerate(factors):
        w = model.add_constant(f"{hint}_{f.tag}_weight", np.asarray(f.weight).astype(dtype))
        inputs = [w, h] if f.weight_first else [h, w]
        if isinstance(f.bias, str):
            inputs.append(model.tensor(f.bias))
        elif f.bias is not None:
            inputs.append(model.add_constant(f"{hint}_{f.tag}_bias", f.bias.astype(dtype)))
        last = i == len(factors) - 1
        node = model.add_node(
            f.op,
            inputs,
            name=f"{hint}_{f.tag}",
            attrs=f.attrs,
            outputs=[out] if last else None,
            dtype=dtype,
        )
        nodes.append(node)
        h = node.outputs[0]
    return nodes


def replace_layer(model: Model, node: Node, f: Factorization) -> list[Node]:
    """Swaps `node` for the chain; the chain's last factor takes over the output tensor."""
    x = node.inputs[f.input_index]
    out = node.outputs[0]
    dtype = out.dtype if out.dtype is not None else layer_weight(model, node)[1].dtype  # type: ignore[index]
    node.outputs.clear()
    nodes = build_chain(model, f.factors, x, out, hint=node.name, dtype=dtype)
    model.remove_nodes([node])
    return nodes
