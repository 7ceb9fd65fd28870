"""Depthwise-separable approximation of convolutions: replaces a k x k Conv with a
depthwise k x k Conv of channel multiplier r (group = Cin, Cin * r outputs) followed by a
1x1 Conv (Cin * r -> Cout), fitted per input channel by SVD, without retraining.

AdaDeep's depthwise-separable technique, made data-free: input channel c contributes
`W[:, c] * x_c`, a (Cout, k*k) matrix of filters applied to one channel; its rank-r SVD
`U_r Σ_r V_rᵀ` gives r depthwise filters (rows of `Σ^½ Vᵀ`) and their mixing weights in the
1x1 Conv (columns of `U Σ^½`). Depthwise output channel `c * r + t` holds component t of
input channel c, which is ONNX's grouped-convolution order. Exact at r = min(Cout, k*k).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from tailor.ir.layers import layer_weight
from tailor.ir.model import Model, Node
from tailor.passes._lowrank import BIAS_CORRECTION, FORCE, LowRankPass
from tailor.passes._lowrank_chain import Factor, Factorization, chain_params
from tailor.passes._lowrank_math import resolve_rank, weight_rel_error
from tailor.passes.base import Param
from tailor.passes.registry import register

__all__ = ["DepthwiseSeparable"]

logger = logging.getLogger(__name__)


@register
class DepthwiseSeparable(LowRankPass):
    """Approximates k x k Conv layers by a depthwise k x k Conv and a 1x1 Conv, fitted by SVD.

    `rank` is the depthwise channel multiplier r, a fraction of min(Cout, k*k) or an
    integer; each input channel's filters are fitted by SVD, and at r = min(Cout, k*k)
    the pair is exact. Only ordinary convolutions (group=1) with a kernel larger than 1
    apply, and only when the pair costs under 0.9x the layer's parameters and MACs (r
    below about 0.9x the break-even Cout k² / (Cout + k²)); others are skipped (noted)
    unless `force`. The depthwise Conv keeps the strides, pads and
    dilations; the 1x1 Conv takes the bias. Biases are corrected on calibration data
    when present (`bias_correction`).
    """

    name = "depthwise_separable"
    ops = ("Conv",)
    params = (
        Param(
            "rank",
            "rank",
            0.25,
            "channel multiplier r: a fraction of min(Cout, k*k) or an integer",
            search=(0.1, 0.5),
        ),
        BIAS_CORRECTION,
        FORCE,
    )

    def applicable(self, model: Model, node: Node) -> str | None:
        _, w = layer_weight(model, node)  # type: ignore[misc]
        if int(node.attrs.get("group", 1)) != 1:
            return f"grouped convolution (group={node.attrs.get('group')})"
        if w.ndim < 3:
            return f"its weight has {w.ndim} dimensions"
        if math.prod(w.shape[2:]) == 1:
            return "1x1 convolution (already pointwise)"
        return None

    def factorize(self, model: Model, node: Node, stats: Any) -> Factorization | str:
        _, weight = layer_weight(model, node)  # type: ignore[misc]
        w = np.asarray(weight, np.float64)
        cout, cin = w.shape[:2]
        kernel = w.shape[2:]
        taps = math.prod(kernel)
        full = min(cout, taps)
        r = resolve_rank(self.config["rank"], full)
        # One SVD per input channel, batched: per_channel[c] is W[:, c] as (Cout, k*k).
        per_channel = np.moveaxis(w.reshape(cout, cin, taps), 1, 0)
        u, s, vt = np.linalg.svd(per_channel, full_matrices=False)
        root = np.sqrt(s[:, :r])  # (Cin, r)
        depthwise = (root[:, :, None] * vt[:, :r]).reshape((cin * r, 1) + kernel)
        # pointwise[o, c*r + t] = U_c[o, t] sqrt(s_ct)
        pointwise = (u[:, :, :r] * root[:, None, :]).transpose(1, 0, 2).reshape(cout, cin * r)
        approx = np.moveaxis((u[:, :, :r] * s[:, None, :r]) @ vt[:, :r], 0, 1).reshape(w.shape)
        dw_attrs = {k: v for k, v in node.attrs.items() if k != "group"}
        dw_attrs["group"] = cin
        has_bias = len(node.inputs) > 2 and not node.inputs[2].is_empty()
        factors = [
            Factor("Conv", depthwise, dw_attrs, tag="dw"),
            Factor(
                "Conv",
                pointwise.reshape((cout, cin * r) + (1,) * len(kernel)),
                {"kernel_shape": [1] * len(kernel)},
                bias=node.inputs[2].name if has_bias else None,
                tag="pw",
            ),
        ]
        bias = 0
        if has_bias:
            b = model.constant_value(node.inputs[2])
            bias = 0 if b is None else int(b.size)
        return Factorization(
            factors=factors,
            input_index=0,
            ranks={"rank": r},
            full_ranks={"rank": full},
            params_before=int(w.size) + bias,
            params_after=chain_params(factors, bias),
            weight_rel_error=weight_rel_error(w, approx),
        )
