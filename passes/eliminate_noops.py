"""Removes nodes that provably compute their input unchanged, rewiring their readers.

Removed: Identity; Dropout in inference (mask unused); Cast to the dtype it already
has; Pad with all-zero pads; Transpose with the identity permutation, and two
Transposes that compose to it; Reshape to the shape it already has (static, or a
constant with 0 = copy and at most one -1); Flatten of a 2-D tensor at axis 1; Squeeze
of a tensor with no unit dimensions; Squeeze(Unsqueeze(x)) and Unsqueeze(Squeeze(x))
over the same axes; Concat, Sum, Max, Min and Mean of a single input. Graph output
names never change (see ``Model.replace_uses``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from tailor.ir.model import Constant, Model, Node
from tailor.passes.fold_pad import pad_amounts
from tailor.passes.registry import register
from tailor.passes.rewrite import Match, RewritePass, Rule

__all__ = ["EliminateNoops", "NoopRule", "InversePairRule"]

logger = logging.getLogger(__name__)


def _input(node: Node, i: int):
    return node.inputs[i] if len(node.inputs) > i and not node.inputs[i].is_empty() else None


def _static(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and dim >= 0


def _perm(model: Model, node: Node) -> list[int] | None:
    if "perm" in node.attrs:
        return [int(p) for p in node.attrs["perm"]]
    shape = model.shape(node.inputs[0])
    return None if shape is None else list(range(len(shape)))[::-1]


def _has_axes(model: Model, node: Node) -> bool:
    return "axes" in node.attrs if model.opset < 13 else _input(node, 1) is not None


def _axes(model: Model, node: Node, rank: int | None) -> list[int] | None:
    """Squeeze/Unsqueeze axes (attribute before opset 13, input after), made non-negative;
    None when absent, computed, or negative with an unknown rank."""
    if model.opset < 13:
        raw = node.attrs.get("axes")
    else:
        raw = None if _input(node, 1) is None else model.constant_value(node.inputs[1])
    if raw is None:
        return None
    axes = [int(a) for a in np.asarray(raw).reshape(-1)]
    if any(a < 0 for a in axes):
        if rank is None:
            return None
        axes = [a % rank for a in axes]
    return sorted(axes)


def _reshape_is_noop(model: Model, node: Node) -> str | None:
    shape_in, shape_out = model.shape(node.inputs[0]), model.shape(node.outputs[0])
    if shape_in is None:
        return f"the input shape of {node.name} is unknown"
    if shape_out is not None and all(map(_static, shape_in)) and list(shape_in) == list(shape_out):
        return None
    target = model.constant_value(node.inputs[1])
    if target is None:
        return f"{node.name} reshapes to a computed shape"
    target = [int(d) for d in target.reshape(-1)]
    if len(target) != len(shape_in) or any(d == 0 for d in shape_in if _static(d)):
        return f"{node.name} changes the rank or has empty dimensions"
    copy_zero = int(node.attrs.get("allowzero", 0)) == 0
    kept = [
        (d == 0 and copy_zero) or (_static(s) and d == s)
        for d, s in zip(target, shape_in, strict=True)
    ]
    # A single -1 is inferred from the other dimensions; when they all match, it matches too.
    if all(kept) or (target.count(-1) == 1 and sum(not k for k in kept) == 1 and -1 in target):
        return None
    return f"{node.name} reshapes {shape_in} to {target}"


#: Ops that return their input unchanged when given exactly one.
_VARIADIC = ("Concat", "Sum", "Max", "Min", "Mean")


def _noop_reason(model: Model, node: Node) -> str | None:
    """None when `node` returns its first input unchanged, otherwise why not."""
    op, x = node.op, node.inputs[0]
    if op == "Identity":
        out = node.outputs[0]
        if model.is_graph_output(out) and (
            isinstance(x, Constant) or model.is_graph_input(x) or model.is_graph_output(x)
        ):
            return f"{node.name} gives graph output {out.name} a name of its own"
        return None
    if op == "Dropout":
        mode = _input(node, 2)
        training = mode is not None and (
            model.constant_value(mode) is None or bool(model.constant_value(mode))
        )
        if training or (model.opset < 7 and int(node.attrs.get("is_test", 0)) == 0):
            return f"{node.name} may run in training mode"
        if any(
            not t.is_empty() and (t.outputs or model.is_graph_output(t)) for t in node.outputs[1:]
        ):
            return f"the mask of {node.name} is used"
        return None
    if op == "Cast":
        to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
        return (
            None
            if x.dtype is not None and np.dtype(x.dtype) == to
            else f"{node.name} changes the dtype"
        )
    if op == "Pad":
        amounts = pad_amounts(model, node)
        if isinstance(amounts, str):
            return amounts
        return None if not any(amounts[0] + amounts[1]) else f"{node.name} pads"
    if op == "Transpose":
        perm = _perm(model, node)
        return (
            None
            if perm is not None and perm == sorted(perm)
            else f"{node.name} permutes axes {perm}"
        )
    if op == "Reshape":
        return _reshape_is_noop(model, node)
    if op in _VARIADIC:
        # torch exports `torch.cat([x])` as a one-input Concat
        live = [t for t in node.inputs if not t.is_empty()]
        return None if len(live) == 1 else f"{node.name} combines {len(live)} inputs"
    shape = model.shape(x)
    if op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        return (
            None
            if shape is not None and len(shape) == 2 and axis in (1, -1)
            else f"{node.name} flattens {shape}"
        )
    if op == "Squeeze":
        if _has_axes(model, node):
            return f"{node.name} squeezes explicit axes"
        if shape is None or not all(_static(d) and d != 1 for d in shape):
            return f"{node.name} may squeeze a unit dimension of {shape}"
        return None
    return f"{op} is not a no-op kind"


class NoopRule(Rule):
    """A node that returns its input unchanged  =>  its input."""

    name = "noop"
    ops = (
        "Identity", "Dropout", "Cast", "Pad", "Transpose", "Reshape", "Flatten", "Squeeze",
        *_VARIADIC,
    )  # fmt: skip

    def match(self, model: Model, node: Node) -> Match | str:
        reason = _noop_reason(model, node)
        return reason if reason is not None else Match(node)

    def rewrite(self, model: Model, match: Match) -> str:
        node = match.node
        model.bypass(node)
        return f"removed no-op {node.op} {node.name}"


class InversePairRule(Rule):
    """Transpose(Transpose(x)) composing to identity, Squeeze(Unsqueeze(x)) and
    Unsqueeze(Squeeze(x)) over the same axes  =>  x."""

    name = "inverse_pair"
    ops = ("Transpose", "Squeeze", "Unsqueeze")
    _inverse = {"Transpose": "Transpose", "Squeeze": "Unsqueeze", "Unsqueeze": "Squeeze"}

    def match(self, model: Model, node: Node) -> Match | str:
        inner = model.producer(node.inputs[0])
        if inner is None or inner.op != self._inverse[node.op]:
            return f"{node.name} does not follow a {self._inverse[node.op]}"
        if node.op == "Transpose":
            outer_perm, inner_perm = _perm(model, node), _perm(model, inner)
            if outer_perm is None or inner_perm is None or len(outer_perm) != len(inner_perm):
                return f"the permutations of {inner.name} and {node.name} are unknown"
            if [inner_perm[p] for p in outer_perm] != list(range(len(outer_perm))):
                return f"{inner.name} and {node.name} do not compose to the identity"
            return Match(node, {"inner": inner})
        # Axes refer to the larger of the two ranks: the Unsqueeze's output, the Squeeze's input.
        big = inner.outputs[0] if inner.op == "Unsqueeze" else inner.inputs[0]
        shape = model.shape(big)
        rank = None if shape is None else len(shape)
        a, b = _axes(model, inner, rank), _axes(model, node, rank)
        if a is None or b is None or a != b:
            return f"{inner.name} and {node.name} do not use the same known axes"
        return Match(node, {"inner": inner})

    def rewrite(self, model: Model, match: Match) -> str:
        node, inner = match.node, match.info["inner"]
        source, out = inner.inputs[0], node.outputs[0]
        model.remove_nodes([node])
        model.replace_uses(out, source)
        if not inner.outputs[0].outputs and not model.is_graph_output(inner.outputs[0]):
            model.remove_nodes([inner])
        return f"removed {inner.op} {inner.name} and {node.op} {node.name} (inverse of each other)"


@register
class EliminateNoops(RewritePass):
    """Removes nodes that provably compute their input unchanged, rewiring their readers.

    Covers Identity, inference Dropout, same-dtype Cast, zero Pad, identity and inverse
    Transposes, shape-preserving Reshape/Flatten/Squeeze and Squeeze/Unsqueeze pairs.
    """

    name = "eliminate_noops"
    lossless = True
    needs_shapes = True
    rule_types = (NoopRule, InversePairRule)
