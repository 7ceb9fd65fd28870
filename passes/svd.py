"""Factorizes Gemm and MatMul weights: replaces `x W` with two thin layers `(x A) B` by
truncated SVD, optionally fitted to calibration activations (data-aware, SVD-LLM).

A weight `W` (in x out) of rank r costs `r (in + out)` parameters as two factors instead
of `in * out`; below the break-even rank `in * out / (in + out)` the model shrinks. The
data-aware variant minimises the error of the layer's output on the calibration inputs
(`||X W - X A B||`) rather than of the weight, through the Cholesky factor of `XᵀX`
(see :func:`tailor.passes._lowrank_math.whitened_factors`).

Gemm becomes Gemm -> Gemm (alpha folded into the first factor, C and beta kept on the
second, transB kept on both); before opset 11, where Gemm's C is mandatory, the first
factor is a MatMul. A MatMul with a constant 2-D weight (`x @ W` for activations of any
rank, transformer tokens included, or `W @ x`) becomes MatMul -> MatMul; an Add that
carries its bias stays where it is.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from tailor.ir.layers import layer_weight
from tailor.ir.model import Model, Node
from tailor.passes._lowrank import BIAS_CORRECTION, FORCE, LowRankPass
from tailor.passes._lowrank_chain import Factor, Factorization, chain_params
from tailor.passes._lowrank_data import MAX_GRAM_FEATURES, input_grams
from tailor.passes._lowrank_math import (
    energy_rank,
    resolve_rank,
    truncated_svd,
    weight_rel_error,
    whitened_factors,
)
from tailor.passes.base import Param
from tailor.passes.registry import register

__all__ = ["SVD"]

logger = logging.getLogger(__name__)


def _matrix(model: Model, node: Node) -> tuple[np.ndarray, int, bool]:
    """The layer as `y_rows = x_rows @ M` (M in x out), its data input index, and whether
    the input's features sit on the second-to-last axis (`W @ x`)."""
    widx, w = layer_weight(model, node)  # type: ignore[misc]
    w = np.asarray(w, np.float64)
    if node.op == "Gemm":
        alpha = float(node.attrs.get("alpha", 1.0))
        return alpha * (w.T if int(node.attrs.get("transB", 0)) else w), 0, False
    if widx == 1:
        return w, 0, False
    return w.T, 1, True


@register
class SVD(LowRankPass):
    """Factorizes Gemm and MatMul weights into two thin layers by truncated SVD.

    `rank` is a fraction of min(in, out) or an integer rank; `energy` (when above 0)
    overrides it with the smallest rank holding that fraction of the squared singular
    values. A layer is factorized only when the two factors cost under 0.9x its
    parameters and MACs (a rank below about 0.9x the break-even `in * out / (in + out)`);
    others are skipped (noted) unless `force`. With `data_aware` and calibration data, the
    factors minimise the layer's output error on the captured inputs (whitened SVD, as
    in SVD-LLM), and `energy` counts the singular values of the whitened weight (output
    energy); without data the pass falls back to plain SVD and says so. Biases are
    corrected on calibration data when present (`bias_correction`).
    """

    name = "svd"
    ops = ("Gemm", "MatMul")
    params = (
        Param(
            "rank",
            "rank",
            0.25,
            "kept rank: a fraction of min(in, out) or an integer",
            search=(0.05, 0.5),
        ),
        Param(
            "energy",
            "float",
            0.0,
            "keep the smallest rank holding this fraction of the squared singular values "
            "(overrides rank; 0: use rank)",
            low=0.0,
            high=1.0,
        ),
        Param(
            "data_aware",
            "bool",
            False,
            "minimise the output error on calibration activations (whitened SVD, SVD-LLM)",
        ),
        BIAS_CORRECTION,
        FORCE,
    )

    def applicable(self, model: Model, node: Node) -> str | None:
        widx, w = layer_weight(model, node)  # type: ignore[misc]
        if w.ndim != 2:
            return f"its weight has {w.ndim} dimensions (only 2-D weights are factorized)"
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            return "Gemm with transA=1 is not supported"
        if node.op == "MatMul" and model.constant_value(node.inputs[1 - widx]) is not None:
            return "both inputs are constant (fold_constants computes it)"
        if min(w.shape) < 2:
            return f"its weight {list(w.shape)} has rank 1 already"
        return None

    def statistics(
        self, model: Model, nodes: list[Node], data: Mapping[str, np.ndarray] | None
    ) -> tuple[dict[str, Any], list[str]]:
        if not self.config["data_aware"]:
            return {}, []
        if data is None:
            logger.warning("%s: data_aware without calibration data, using plain SVD", self.name)
            return {}, [
                "data_aware: no calibration data, plain SVD used "
                "(pass --data FILE.npz to fit on activations)"
            ]
        wanted: dict[str, set[bool]] = {}
        keys: dict[str, tuple[str, bool]] = {}
        for node in nodes:
            m, index, features_first = _matrix(model, node)
            if m.shape[0] > MAX_GRAM_FEATURES:
                continue
            name = node.inputs[index].name
            wanted.setdefault(name, set()).add(features_first)
            keys[node.name] = (name, features_first)
        if not wanted:
            return {}, []
        grams, rows = input_grams(model, wanted, data)
        return {n: (grams[k], rows[k]) for n, k in keys.items()}, []

    def factorize(self, model: Model, node: Node, stats: Any) -> Factorization | str:
        m, index, features_first = _matrix(model, node)
        n_in, n_out = m.shape
        full = min(n_in, n_out)
        extra: dict[str, Any] = {}
        if stats is not None:
            gram, rows = stats
            a_all, s, b_all = whitened_factors(m, gram)
            extra = {"data_aware": True, "calibration_rows": rows}
            if rows < n_in:
                extra["warning"] = (
                    f"{rows} calibration rows for {n_in} input features: directions the data "
                    "never excite are kept only through the ridge"
                )
        else:
            u, s, vt = truncated_svd(m)
            root = np.sqrt(s)
            a_all, b_all = u * root, root[:, None] * vt
            if self.config["data_aware"]:
                extra = {"data_aware": False}
        energy = self.config["energy"]
        r = energy_rank(s, energy) if energy > 0 else resolve_rank(self.config["rank"], full)
        a, b = a_all[:, :r], b_all[:r]
        factors = self._factors(model, node, a, b, features_first)
        bias = 0
        if node.op == "Gemm" and len(node.inputs) > 2 and not node.inputs[2].is_empty():
            c = model.constant_value(node.inputs[2])
            bias = 0 if c is None else int(c.size)
        return Factorization(
            factors=factors,
            input_index=index,
            ranks={"rank": r},
            full_ranks={"rank": full},
            params_before=int(m.size) + bias,
            params_after=chain_params(factors, bias),
            weight_rel_error=weight_rel_error(m, a @ b),
            extra={**({"energy": energy} if energy > 0 else {}), **extra},
        )

    def _factors(
        self, model: Model, node: Node, a: np.ndarray, b: np.ndarray, features_first: bool
    ) -> list[Factor]:
        if node.op == "MatMul":
            if features_first:  # W @ x = (A B)ᵀ x = Bᵀ (Aᵀ x)
                return [
                    Factor("MatMul", a.T, weight_first=True, tag="svd_a"),
                    Factor("MatMul", b.T, weight_first=True, tag="svd_b"),
                ]
            return [Factor("MatMul", a, tag="svd_a"), Factor("MatMul", b, tag="svd_b")]
        trans_b = int(node.attrs.get("transB", 0))
        rest = {
            k: v for k, v in node.attrs.items() if k not in ("alpha", "beta", "transA", "transB")
        }
        has_c = len(node.inputs) > 2 and not node.inputs[2].is_empty()
        second = Factor(
            "Gemm",
            b.T if trans_b else b,
            {
                **rest,
                "transB": trans_b,
                **({"beta": node.attrs["beta"]} if "beta" in node.attrs and has_c else {}),
            },
            bias=node.inputs[2].name if has_c else None,
            tag="svd_b",
        )
        if model.opset < 11:
            # Gemm's C is mandatory before opset 11; a MatMul needs no zero bias.
            first = Factor("MatMul", a, tag="svd_a")
        else:
            first = Factor("Gemm", a.T if trans_b else a, {"transB": trans_b}, tag="svd_a")
        return [first, second]
