"""Folds BatchNormalization into the preceding Conv, ConvTranspose or Gemm.

In inference a BatchNormalization is a per-channel affine map `s * y + t` with
`s = scale / sqrt(var + eps)` and `t = B - mean * s`; it folds into the layer's weight
(output channels scaled by `s`) and bias (`s * b + t`, created when absent). Folding is
computed in float64 and cast back to the weight's dtype. The selector picks the layer
(the Conv), not the BatchNormalization.
"""

from __future__ import annotations

import logging

import numpy as np

from tailor.ir.model import Model, Node
from tailor.passes.registry import register
from tailor.passes.rewrite import Match, RewritePass, Rule, sole_consumer

__all__ = ["FoldBatchNorm", "FoldBatchNormRule"]

logger = logging.getLogger(__name__)


def _present(node: Node, i: int) -> bool:
    return len(node.inputs) > i and not node.inputs[i].is_empty()


class FoldBatchNormRule(Rule):
    """Conv/ConvTranspose/Gemm -> BatchNormalization  =>  the layer with folded weights."""

    name = "fold_batchnorm"
    ops = ("Conv", "ConvTranspose", "Gemm")

    def match(self, model: Model, node: Node) -> Match | str:
        bn = sole_consumer(model, node.outputs[0])
        if isinstance(bn, str):
            return bn
        if bn.op != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            return f"{node.outputs[0].name} feeds {bn.op}, not BatchNormalization"
        if bn.inputs[0] is not node.outputs[0]:
            return f"{node.outputs[0].name} is not the data input of {bn.name}"
        if any(
            not t.is_empty() and (t.outputs or model.is_graph_output(t)) for t in bn.outputs[1:]
        ):
            return f"{bn.name} is in training form (its running statistics are used)"
        if int(bn.attrs.get("training_mode", 0)) != 0:
            return f"{bn.name} has training_mode=1"
        if model.opset < 7 and int(bn.attrs.get("is_test", 0)) == 0:
            return f"{bn.name} has is_test=0 (training mode)"
        if int(bn.attrs.get("spatial", 1)) != 1:
            return f"{bn.name} has spatial=0"
        params = [model.constant_value(t) for t in bn.inputs[1:5]]
        if len(params) != 4 or any(p is None for p in params):
            return f"the parameters of {bn.name} are not constants"
        weight = model.constant_value(node.inputs[1])
        if weight is None or not np.issubdtype(weight.dtype, np.floating):
            return f"the weight of {node.name} is not a float constant"
        bias = model.constant_value(node.inputs[2]) if _present(node, 2) else None
        if _present(node, 2) and bias is None:
            return f"the bias of {node.name} is not a constant"
        groups = int(node.attrs.get("group", 1))
        if node.op == "Conv":
            channels = weight.shape[0]
        elif node.op == "ConvTranspose":
            channels = weight.shape[1] * groups
        else:
            if weight.ndim != 2:
                return f"the weight of {node.name} is not 2-D"
            channels = weight.shape[0] if int(node.attrs.get("transB", 0)) else weight.shape[1]
        if any(p.size != channels for p in params):
            return f"{bn.name} has parameters of a size other than {channels} channels"
        return Match(
            node, {"bn": bn, "params": params, "weight": weight, "bias": bias, "groups": groups}
        )

    def rewrite(self, model: Model, match: Match) -> str:
        node, bn, info = match.node, match.info["bn"], match.info
        scale, shift, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in info["params"])
        s = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        weight = np.asarray(info["weight"], np.float64)
        dtype = info["weight"].dtype
        bias = info["bias"]
        if node.op == "Conv":
            weight = weight * s.reshape((-1,) + (1,) * (weight.ndim - 1))
        elif node.op == "ConvTranspose":
            # Weight layout [Cin, Cout/g, k...]: output channel g*(Cout/g)+j is column j of group g.
            g = info["groups"]
            grouped = weight.reshape((g, weight.shape[0] // g) + weight.shape[1:])
            grouped = grouped * s.reshape((g, 1, -1) + (1,) * (weight.ndim - 2))
            weight = grouped.reshape(weight.shape)
        else:
            weight = weight * (s[:, None] if int(node.attrs.get("transB", 0)) else s[None, :])
        if node.op == "Gemm":
            beta = float(node.attrs.get("beta", 1.0))
            c = np.zeros(1) if bias is None else np.asarray(bias, np.float64) * beta
            new_bias = s * (c - mean) + shift
            node.attrs["beta"] = 1.0
        else:
            b = np.zeros_like(s) if bias is None else np.asarray(bias, np.float64).reshape(-1)
            new_bias = s * (b - mean) + shift
        node.inputs[1] = model.add_constant(f"{node.inputs[1].name}_bnfold", weight.astype(dtype))
        bias_const = model.add_constant(f"{node.name}_bias_bnfold", new_bias.astype(dtype))
        if len(node.inputs) > 2:
            node.inputs[2] = bias_const
        else:
            node.inputs.append(bias_const)
        model.bypass(bn)
        return f"folded {bn.name} into {node.name}"


@register
class FoldBatchNorm(RewritePass):
    """Folds BatchNormalization into the preceding Conv, ConvTranspose or Gemm.

    Applies when the layer's output feeds only that BatchNormalization (inference form,
    constant parameters); the BatchNormalization's output name is kept.
    """

    name = "fold_batchnorm"
    lossless = True
    rule_types = (FoldBatchNormRule,)
