"""Tucker-2 decomposition of convolutions: replaces a k x k Conv with a 1x1 Conv (Cin -> R1),
a k x k core Conv (R1 -> R2, with the original strides, pads and dilations) and a 1x1 Conv
(R2 -> Cout, with the bias).

The weight `W` (Cout, Cin, k...) is approximated as `G ×₀ U_out ×₁ U_in` with orthonormal
factors of the output and input modes, initialised by HOSVD and refined by a few HOOI
iterations (Kim et al. 2016, "Compression of deep convolutional neural networks for fast
and low power mobile applications"). Ranks are a fraction or integer (`rank`, both
modes), estimated per mode by EVBMF on the mode-0 and mode-1 unfoldings (`method=vbmf`,
as Kim et al.), or the smallest holding `energy` of each unfolding's squared singular
values (`method=energy`). At full ranks the chain is exact.

HOOI over two modes is a handful of SVDs of unfoldings, written here in numpy; tensorly's
`partial_tucker` computes the same thing but would add a dependency with its own backend
machinery for one loop.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tailor.errors import ParameterError
from tailor.ir.layers import layer_weight
from tailor.ir.model import Model, Node
from tailor.passes._lowrank import BIAS_CORRECTION, FORCE, LowRankPass
from tailor.passes._lowrank_chain import Factor, Factorization, chain_params
from tailor.passes._lowrank_math import energy_rank, evbmf_rank, resolve_rank, weight_rel_error
from tailor.passes.base import Param
from tailor.passes.registry import register

__all__ = ["Tucker2", "tucker2_decompose", "tucker2_reconstruct"]

logger = logging.getLogger(__name__)

METHODS = ("rank", "vbmf", "energy")
#: HOOI refinements after the HOSVD initialisation; the fit stops improving after a few.
HOOI_ITERATIONS = 5


def _unfold(w: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)


def _leading(matrix: np.ndarray, r: int) -> np.ndarray:
    """The `r` leading left singular vectors of a (C, C * k...) unfolding, as eigenvectors
    of its C x C Gram matrix: a fraction of the time of its SVD (0.8 s for 512 x 4608),
    and an orthonormal basis however small the singular values (so full rank stays exact)."""
    _, vectors = np.linalg.eigh(matrix @ matrix.T)
    return vectors[:, ::-1][:, :r]


def _project(t: np.ndarray, u: np.ndarray, mode: int) -> np.ndarray:
    """Contracts `mode` of `t` with the rows of `u` (that mode's size becomes u's columns).

    tensordot, not einsum: a three-operand einsum without path optimisation contracts in
    one naive loop, which takes minutes on a 512-channel convolution.
    """
    return np.moveaxis(np.tensordot(t, u, axes=([mode], [0])), -1, mode)


def tucker2_reconstruct(core: np.ndarray, u_out: np.ndarray, u_in: np.ndarray) -> np.ndarray:
    """The weight `core ×₀ u_out ×₁ u_in` that a Tucker-2 chain computes."""
    return _project(_project(core, u_out.T, 0), u_in.T, 1)


def tucker2_decompose(
    w: np.ndarray, r_out: int, r_in: int, iterations: int = HOOI_ITERATIONS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 factors of a Conv weight over its output and input channel modes.

    Args:
        w: `(Cout, Cin, k...)`.
        r_out, r_in: ranks of the output and input modes.
        iterations: HOOI sweeps after the HOSVD initialisation.

    Returns:
        `(core, u_out, u_in)`: `(r_out, r_in, k...)`, `(Cout, r_out)`, `(Cin, r_in)` with
        `w ≈ tucker2_reconstruct(core, u_out, u_in)`.
    """
    w = np.asarray(w, np.float64)
    u_out = _leading(_unfold(w, 0), r_out)
    u_in = _leading(_unfold(w, 1), r_in)
    if r_out < w.shape[0] or r_in < w.shape[1]:
        for _ in range(iterations):
            # Each mode's factor is refit on the weight projected onto the other's subspace.
            u_out = _leading(_unfold(_project(w, u_in, 1), 0), r_out)
            u_in = _leading(_unfold(_project(w, u_out, 0), 1), r_in)
    core = _project(_project(w, u_out, 0), u_in, 1)
    return core, u_out, u_in


@register
class Tucker2(LowRankPass):
    """Decomposes k x k Conv layers into 1x1 -> k x k core -> 1x1 (Tucker-2).

    Ranks per mode: `rank` (a fraction of the channels or an integer, for both the input
    and the output mode), or `method=vbmf` (EVBMF on the mode unfoldings, Kim et al. 2016)
    or `method=energy` with an `energy` threshold (giving `energy` alone selects it).
    Only ordinary convolutions (group=1) with a kernel larger than 1x1 apply, and only
    when the chain costs under 0.9x the layer's parameters and MACs (the first 1x1 runs
    at the input's resolution, before a strided core); others are skipped (noted)
    unless `force`. The core
    keeps the strides, pads and dilations; the last 1x1 takes the bias. Biases are
    corrected on calibration data when present (`bias_correction`).
    """

    name = "tucker2"
    ops = ("Conv",)
    params = (
        Param(
            "rank",
            "rank",
            0.5,
            "kept rank of both channel modes: a fraction of the channels or an integer",
            search=(0.1, 0.75),
        ),
        Param(
            "method",
            "choice",
            "rank",
            "how ranks are chosen: rank (the rank parameter), vbmf (estimated) or energy",
            choices=METHODS,
            search=METHODS,
        ),
        Param(
            "energy",
            "float",
            0.0,
            "with method=energy: fraction of each unfolding's squared singular values kept",
            low=0.0,
            high=1.0,
        ),
        BIAS_CORRECTION,
        FORCE,
    )

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        method, energy = self.config["method"], self.config["energy"]
        if method == "vbmf" and energy > 0:
            raise ParameterError(
                f"pass {self.name}: energy={energy} conflicts with method=vbmf; give one of them"
            )
        if method == "energy" and energy <= 0:
            raise ParameterError(f"pass {self.name}: method=energy needs energy in (0, 1]")

    @property
    def method(self) -> str:
        """The rank method in effect: `energy` alone selects method=energy."""
        return "energy" if self.config["energy"] > 0 else self.config["method"]

    def applicable(self, model: Model, node: Node) -> str | None:
        _, w = layer_weight(model, node)  # type: ignore[misc]
        if int(node.attrs.get("group", 1)) != 1:
            return f"grouped convolution (group={node.attrs.get('group')})"
        if w.ndim < 3:
            return f"its weight has {w.ndim} dimensions"
        if all(k == 1 for k in w.shape[2:]):
            return "1x1 convolution (no spatial core to keep; use prune_channels)"
        return None

    def _ranks(self, w: np.ndarray) -> tuple[int, int]:
        cout, cin = w.shape[:2]
        method = self.method
        if method == "vbmf":
            # EVBMF may call a mode pure noise (rank 0); one component is the least a layer keeps.
            return (
                max(1, min(cout, evbmf_rank(_unfold(w, 0)))),
                max(1, min(cin, evbmf_rank(_unfold(w, 1)))),
            )
        if method == "energy":
            energy = self.config["energy"]
            return (
                energy_rank(np.linalg.svd(_unfold(w, 0), compute_uv=False), energy),
                energy_rank(np.linalg.svd(_unfold(w, 1), compute_uv=False), energy),
            )
        return resolve_rank(self.config["rank"], cout), resolve_rank(self.config["rank"], cin)

    def factorize(self, model: Model, node: Node, stats: Any) -> Factorization | str:
        _, weight = layer_weight(model, node)  # type: ignore[misc]
        w = np.asarray(weight, np.float64)
        cout, cin = w.shape[:2]
        spatial = w.ndim - 2
        r_out, r_in = self._ranks(w)
        core, u_out, u_in = tucker2_decompose(w, r_out, r_in)
        approx = tucker2_reconstruct(core, u_out, u_in)
        point = {"kernel_shape": [1] * spatial}
        core_attrs = {k: v for k, v in node.attrs.items() if k != "group"}
        has_bias = len(node.inputs) > 2 and not node.inputs[2].is_empty()
        factors = [
            Factor("Conv", u_in.T.reshape((r_in, cin) + (1,) * spatial), point, tag="tucker_in"),
            Factor("Conv", core, core_attrs, tag="tucker_core"),
            Factor(
                "Conv",
                u_out.reshape((cout, r_out) + (1,) * spatial),
                point,
                bias=node.inputs[2].name if has_bias else None,
                tag="tucker_out",
            ),
        ]
        bias = 0
        if has_bias:
            b = model.constant_value(node.inputs[2])
            bias = 0 if b is None else int(b.size)
        return Factorization(
            factors=factors,
            input_index=0,
            ranks={"in": r_in, "out": r_out},
            full_ranks={"in": cin, "out": cout},
            params_before=int(w.size) + bias,
            params_after=chain_params(factors, bias),
            weight_rel_error=weight_rel_error(w, approx),
            extra={"method": self.method},
        )
