"""Replaces MatMul followed by a bias Add with one Gemm.

`Add(MatMul(A, B), c)` with `A` of rank 2, `B` a constant matrix and `c` a constant
broadcastable to `[N]` (shape `[]`, `[1]`, `[N]`, `[1, 1]` or `[1, N]`) is exactly
`Gemm(A, B, c)`. The Gemm keeps the MatMul's name, so layer selectors still find it, and
the Add's output tensor, so graph output names are kept.
"""

from __future__ import annotations

import logging

import numpy as np

from tailor.ir.model import Model, Node
from tailor.passes.registry import register
from tailor.passes.rewrite import Match, RewritePass, Rule, sole_consumer

__all__ = ["MatMulAddToGemm", "MatMulAddRule"]

logger = logging.getLogger(__name__)


class MatMulAddRule(Rule):
    """MatMul(A, constant B) -> Add(constant c)  =>  Gemm(A, B, c)."""

    name = "matmul_add_to_gemm"
    ops = ("MatMul",)

    def match(self, model: Model, node: Node) -> Match | str:
        a, b = node.inputs[0], node.inputs[1]
        a_shape = model.shape(a)
        if a_shape is None or len(a_shape) != 2:
            return f"input {a.name} of {node.name} is not known to be 2-D (shape {a_shape})"
        weight = model.constant_value(b)
        if weight is None or weight.ndim != 2:
            return f"the second input of {node.name} is not a constant matrix"
        if not np.issubdtype(weight.dtype, np.floating):
            return f"{node.name} is not a floating-point MatMul"
        add = sole_consumer(model, node.outputs[0])
        if isinstance(add, str):
            return add
        if add.op != "Add":
            return f"{node.outputs[0].name} feeds {add.op}, not Add"
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        bias = model.constant_value(other)
        if bias is None:
            return f"the other input of {add.name} is not a constant"
        n = weight.shape[1]
        ok = bias.dtype == weight.dtype and (
            bias.ndim == 0
            or (bias.ndim == 1 and bias.shape[0] in (1, n))
            or (bias.ndim == 2 and bias.shape[0] == 1 and bias.shape[1] in (1, n))
        )
        if not ok:
            return f"the bias of {add.name} (shape {list(bias.shape)}) does not broadcast to [{n}]"
        return Match(node, {"add": add, "bias": other})

    def rewrite(self, model: Model, match: Match) -> str:
        mm, add = match.node, match.info["add"]
        a, b, out = mm.inputs[0], mm.inputs[1], add.outputs[0]
        name = mm.name
        model.remove_nodes([mm, add])
        gemm = model.add_node(
            "Gemm", [a, b, match.info["bias"]], name=f"{name}_gemm", outputs=[out]
        )
        gemm.name = name  # free again now that the MatMul is gone
        return f"replaced {name} and {add.name} with Gemm {name}"


@register
class MatMulAddToGemm(RewritePass):
    """Replaces MatMul followed by a bias Add with one Gemm.

    Applies when the MatMul's left input is 2-D, its right input a constant matrix, its
    output feeds only the Add, and the Add's other input is a constant row of biases.
    """

    name = "matmul_add_to_gemm"
    lossless = True
    needs_shapes = True
    rule_types = (MatMulAddRule,)
