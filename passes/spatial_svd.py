"""Spatial SVD of convolutions: replaces a kh x kw Conv with a kh x 1 Conv (Cin -> R)
followed by a 1 x kw Conv (R -> Cout), by truncated SVD of the weight reshaped to
(Cin * kh, Cout * kw) (Jaderberg et al. 2014; AIMET's spatial SVD).

Strides, dilations and pads are split per axis: the vertical factor takes those of the
height axis, the horizontal one those of the width axis. A zero-padded column read by the
vertical factor gives zero (it has no bias), so padding the width after it is the same
as padding the input: the chain is exact at full rank `min(Cin * kh, Cout * kw)`.
`auto_pad` SAME/VALID splits per axis too and is kept on both factors.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tailor.ir.layers import layer_weight
from tailor.ir.model import Model, Node
from tailor.passes._lowrank import BIAS_CORRECTION, FORCE, LowRankPass
from tailor.passes._lowrank_chain import Factor, Factorization, chain_params
from tailor.passes._lowrank_math import resolve_rank, truncated_svd, weight_rel_error
from tailor.passes.base import Param
from tailor.passes.registry import register

__all__ = ["SpatialSVD", "axis_attrs"]

logger = logging.getLogger(__name__)


def axis_attrs(attrs: dict[str, Any], kernel: tuple[int, int], axis: int) -> dict[str, Any]:
    """The attributes of the factor that convolves along one spatial `axis` (0: height,
    1: width) of a 2-D Conv with these `attrs`; the other axis gets a 1-wide kernel."""
    strides = [int(s) for s in attrs.get("strides", [1, 1])]
    dilations = [int(d) for d in attrs.get("dilations", [1, 1])]
    pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    keep = [i == axis for i in range(2)]
    out: dict[str, Any] = {
        "kernel_shape": [k if on else 1 for k, on in zip(kernel, keep, strict=True)],
        "strides": [s if on else 1 for s, on in zip(strides, keep, strict=True)],
        "dilations": [d if on else 1 for d, on in zip(dilations, keep, strict=True)],
    }
    if auto_pad != "NOTSET":
        # SAME pads each axis from its own kernel, stride and size: a 1-wide, stride-1 axis
        # gets none, the other exactly what the original did.
        out["auto_pad"] = auto_pad
    else:
        out["pads"] = [p if keep[i % 2] else 0 for i, p in enumerate(pads)]
    return out


@register
class SpatialSVD(LowRankPass):
    """Splits kh x kw Conv layers into kh x 1 then 1 x kw convolutions by SVD.

    `rank` is the number of intermediate channels: a fraction of the full (exact) rank
    min(Cin * kh, Cout * kw) or an integer. Only ordinary 2-D convolutions (group=1) with
    kh > 1 and kw > 1 apply, and only when the pair costs under 0.9x the layer's
    parameters and MACs (a rank below about 0.9x the break-even
    Cin Cout kh kw / (Cin kh + Cout kw); the vertical factor runs at the input's width);
    others are skipped (noted) unless `force`. Biases are
    corrected on calibration data when present (`bias_correction`).
    """

    name = "spatial_svd"
    ops = ("Conv",)
    params = (
        Param(
            "rank",
            "rank",
            0.25,
            "intermediate channels: a fraction of min(Cin*kh, Cout*kw) or an integer",
            search=(0.05, 0.5),
        ),
        BIAS_CORRECTION,
        FORCE,
    )

    def applicable(self, model: Model, node: Node) -> str | None:
        _, w = layer_weight(model, node)  # type: ignore[misc]
        if int(node.attrs.get("group", 1)) != 1:
            return f"grouped convolution (group={node.attrs.get('group')})"
        if w.ndim != 4:
            return f"not a 2-D convolution (weight of {w.ndim} dimensions)"
        if w.shape[2] < 2 or w.shape[3] < 2:
            return f"kernel {w.shape[2]}x{w.shape[3]} is not separable into kh x 1 and 1 x kw"
        return None

    def factorize(self, model: Model, node: Node, stats: Any) -> Factorization | str:
        _, weight = layer_weight(model, node)  # type: ignore[misc]
        w = np.asarray(weight, np.float64)
        cout, cin, kh, kw = w.shape
        # m[c*kh + i, o*kw + j] = w[o, c, i, j]: rows are vertical taps, columns horizontal.
        m = w.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)
        u, s, vt = truncated_svd(m)
        full = len(s)
        r = resolve_rank(self.config["rank"], full)
        root = np.sqrt(s[:r])
        vertical = (u[:, :r] * root).T.reshape(r, cin, kh, 1)
        horizontal = (root[:, None] * vt[:r]).reshape(r, cout, kw).transpose(1, 0, 2)[:, :, None, :]
        has_bias = len(node.inputs) > 2 and not node.inputs[2].is_empty()
        factors = [
            Factor("Conv", vertical, axis_attrs(node.attrs, (kh, kw), 0), tag="svd_v"),
            Factor(
                "Conv",
                horizontal,
                axis_attrs(node.attrs, (kh, kw), 1),
                bias=node.inputs[2].name if has_bias else None,
                tag="svd_h",
            ),
        ]
        bias = 0
        if has_bias:
            b = model.constant_value(node.inputs[2])
            bias = 0 if b is None else int(b.size)
        approx = (u[:, :r] * s[:r]) @ vt[:r]
        return Factorization(
            factors=factors,
            input_index=0,
            ranks={"rank": r},
            full_ranks={"rank": full},
            params_before=int(w.size) + bias,
            params_after=chain_params(factors, bias),
            weight_rel_error=weight_rel_error(m, approx),
        )
