"""Folds a zero Pad into the `pads` of the following Conv or AveragePool.

A constant-mode Pad with value 0 and non-negative spatial pads in front of a Conv
(explicit padding, `auto_pad` NOTSET) is the Conv's own zero padding; in front of an
AveragePool it is too when `count_include_pad=1` (padded zeros count in the average).
Pads come from attributes before opset 11 and from constant inputs from opset 11 on,
with the optional `axes` input from opset 18. The selector picks the Conv/AveragePool.
"""

from __future__ import annotations

import logging

import numpy as np

from tailor.ir.model import Model, Node
from tailor.passes.registry import register
from tailor.passes.rewrite import Match, RewritePass, Rule, sole_consumer

__all__ = ["FoldPad", "FoldPadRule", "pad_amounts", "pad_value"]

logger = logging.getLogger(__name__)


def _input(node: Node, i: int):
    return node.inputs[i] if len(node.inputs) > i and not node.inputs[i].is_empty() else None


def pad_amounts(model: Model, pad: Node) -> tuple[list[int], list[int]] | str:
    """The (begins, ends) a Pad adds on every axis, or why they are not known statically."""
    if model.opset < 11:
        raw = pad.attrs.get("pads", pad.attrs.get("paddings"))
        pads = None if raw is None else np.asarray(list(raw), np.int64)
    else:
        src = _input(pad, 1)
        pads = None if src is None else model.constant_value(src)
    if pads is None:
        return f"the pads of {pad.name} are not constant"
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes_in = _input(pad, 3) if model.opset >= 18 else None
    if axes_in is None:
        half = len(pads) // 2
        return pads[:half], pads[half:]
    axes = model.constant_value(axes_in)
    shape = model.shape(pad.inputs[0])
    if axes is None or shape is None:
        return f"the axes of {pad.name} are not constant or its input rank is unknown"
    rank = len(shape)
    begins, ends = [0] * rank, [0] * rank
    for k, axis in enumerate(int(a) for a in np.asarray(axes).reshape(-1)):
        begins[axis % rank] += pads[k]
        ends[axis % rank] += pads[k + len(pads) // 2]
    return begins, ends


def pad_value(model: Model, pad: Node) -> float | str:
    """The constant a Pad fills with, or why it is not a known constant."""
    if model.opset < 11:
        return float(pad.attrs.get("value", 0.0))
    src = _input(pad, 2)
    if src is None:
        return 0.0
    value = model.constant_value(src)
    if value is None or value.size != 1:
        return f"the fill value of {pad.name} is not a constant scalar"
    return float(np.asarray(value).reshape(-1)[0])


class FoldPadRule(Rule):
    """Pad(x, zeros on N and C, 0-valued) -> Conv/AveragePool  =>  Conv/AveragePool with larger pads."""

    name = "fold_pad"
    ops = ("Conv", "AveragePool")

    def match(self, model: Model, node: Node) -> Match | str:
        pad = model.producer(node.inputs[0])
        if pad is None or pad.op != "Pad":
            return f"the input of {node.name} does not come from a Pad"
        if isinstance(consumer := sole_consumer(model, pad.outputs[0]), str):
            return consumer
        if str(node.attrs.get("auto_pad", "NOTSET")) != "NOTSET":
            return f"{node.name} uses auto_pad"
        if node.op == "AveragePool" and int(node.attrs.get("count_include_pad", 0)) != 1:
            return f"{node.name} excludes padding from its averages (count_include_pad=0)"
        mode = pad.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode != "constant":
            return f"{pad.name} pads in {mode} mode"
        value = pad_value(model, pad)
        if isinstance(value, str) or value != 0.0:
            return value if isinstance(value, str) else f"{pad.name} pads with {value}, not 0"
        amounts = pad_amounts(model, pad)
        if isinstance(amounts, str):
            return amounts
        begins, ends = amounts
        if len(begins) < 3:
            return f"{pad.name} pads a tensor of rank {len(begins)}"
        if min(begins + ends) < 0:
            return f"{pad.name} crops (negative pads)"
        if any(begins[:2] + ends[:2]):
            return f"{pad.name} pads the batch or channel axis"
        spatial = len(begins) - 2
        old = [int(p) for p in node.attrs.get("pads", [0] * (2 * spatial))]
        if len(old) != 2 * spatial:
            return f"{node.name} has {len(old)} pads for {spatial} spatial axes"
        new = [old[i] + begins[2 + i] for i in range(spatial)] + [
            old[spatial + i] + ends[2 + i] for i in range(spatial)
        ]
        return Match(node, {"pad": pad, "pads": new})

    def rewrite(self, model: Model, match: Match) -> str:
        node, pad = match.node, match.info["pad"]
        node.inputs[0] = pad.inputs[0]
        node.attrs["pads"] = match.info["pads"]
        node.attrs.pop("auto_pad", None)
        model.remove_nodes([pad])
        return f"folded {pad.name} into {node.name} (pads {match.info['pads']})"


@register
class FoldPad(RewritePass):
    """Folds a zero Pad into the `pads` of the following Conv or AveragePool.

    Applies to constant-mode Pads with value 0 and non-negative pads on spatial axes
    only, feeding only a Conv (`auto_pad` NOTSET) or an AveragePool with
    `count_include_pad=1`.
    """

    name = "fold_pad"
    lossless = True
    needs_shapes = True
    rule_types = (FoldPadRule,)
