"""Low-rank machinery shared by the factorization passes: replaces one weighted layer with a
chain of thinner factor layers, then corrects biases and measures errors on calibration data.

The passes (`svd`, `tucker2`, `spatial_svd`, `depthwise_separable`) only say how to factor a
weight; this module does the rest once:

- rank resolution: `rank` as a fraction of the full rank or an integer, an `energy`
  threshold on squared singular values, or empirical Variational Bayes (EVBMF, Nakajima
  et al. 2013) as in Kim et al. 2016;
- the data-aware (whitened) SVD of SVD-LLM: minimise `||X W - X A B||` through the
  Cholesky factor of `XᵀX` instead of `||W - A B||`;
- :class:`LowRankPass`, the driver: select layers, factor them, splice the chains in
  (the layer's output tensor, and so every graph output name, is kept), correct biases,
  report per-layer ranks, parameters and errors;
- :func:`correct_bias`: empirical bias correction (shift each output channel by the mean
  error `E[y - y']` on calibration data, layer after layer), reusable by any pass that
  perturbs weights (quantization included).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import scipy.linalg
import scipy.optimize

from tailor.errors import DynamicShapeError
from tailor.ir.activations import capture
from tailor.ir.layers import is_layer_node, layer_weight, summarize
from tailor.ir.model import Model, Node, Variable
from tailor.passes.base import Param, Pass, PassContext, PassResult
from tailor.passes.rewrite import refresh_shapes

__all__ = [
    "BIAS_CORRECTION",
    "FORCE",
    "BiasShift",
    "Factor",
    "Factorization",
    "LowRankPass",
    "break_even_rank",
    "build_chain",
    "chain_params",
    "channel_axis",
    "correct_bias",
    "energy_rank",
    "evbmf_rank",
    "input_grams",
    "resolve_rank",
    "truncated_svd",
    "weight_rel_error",
    "whitened_factors",
]

logger = logging.getLogger(__name__)

#: Calibration samples used for statistics, bias correction and error measurement.
MAX_SAMPLES = 128
#: Ridge added to `XᵀX` before the Cholesky factorization, relative to its mean diagonal:
#: directions the calibration data never excite still get a small weight.
WHITEN_RIDGE = 1e-3
#: Input features above which a data-aware fit is not attempted (a d x d float64 Gram).
MAX_GRAM_FEATURES = 8192
#: Float64 Gram bytes gathered in one calibration run.
_GRAM_BUDGET = 512 << 20
#: Activation bytes one onnxruntime call may return when capturing, and its batch size:
#: the tensors of many layers are captured in several runs rather than all at once.
_CAPTURE_BUDGET = 256 << 20
_CAPTURE_BATCH = 32
_EMPTY = np.zeros((0,), np.float32)

BIAS_CORRECTION = Param(
    "bias_correction",
    "bool",
    True,
    "with calibration data, shift each factorized layer's bias by its mean output error",
)
FORCE = Param(
    "force",
    "bool",
    False,
    "factorize even layers where it saves no parameters (the model may grow)",
)


# ---------------------------------------------------------------------- ranks
def resolve_rank(rank: float | int, full: int) -> int:
    """A `rank` parameter as a rank: an integer is capped at `full`; a fraction in (0, 1]
    is rounded up (so `1.0` is the full, exact rank), at least 1."""
    if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
        return max(1, min(int(rank), full))
    return max(1, min(full, math.ceil(round(float(rank) * full, 9))))


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """The smallest rank whose singular values hold `energy` of the total squared ones."""
    s2 = np.asarray(singular_values, np.float64) ** 2
    total = float(s2.sum())
    if total <= 0.0:
        return 1
    kept = np.cumsum(s2) / total
    return int(min(len(s2), np.searchsorted(kept, energy - 1e-12) + 1))


def break_even_rank(rows: int, cols: int) -> float:
    """The rank at which two factors `rows x r` and `r x cols` hold as many parameters as
    the `rows x cols` matrix they replace."""
    return rows * cols / (rows + cols)


def evbmf_rank(matrix: np.ndarray) -> int:
    """Rank kept by empirical Variational Bayes matrix factorization (EVBMF).

    The global analytic solution of Nakajima, Sugiyama, Babacan and Tomioka (JMLR 2013):
    the noise variance is estimated by minimising the closed-form free energy over its
    analytic bounds, and singular values above the EVB threshold
    `sqrt(M σ² (1 + τ̄)(1 + α/τ̄))` (`α = L/M`, `τ̄ = 2.5129 √α`) are kept. Kim et al. 2016
    use it on the mode-0 and mode-1 unfoldings of a Conv weight to pick Tucker-2 ranks.

    Returns:
        The estimated rank (0 when the matrix looks like pure noise).
    """
    y = np.asarray(matrix, np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    if rows == 0 or float(s[0]) <= 0.0:
        return 0
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    s2 = s**2
    # Analytic bounds of the noise variance (Nakajima et al. 2013, Theorem 8).
    eh_ub = int(min(math.ceil(rows / (1.0 + alpha)) - 1, rows)) - 1
    upper = float(s2.sum()) / (rows * cols)
    lower = max(float(s2[eh_ub + 1]) / (cols * x_bar), float(np.mean(s2[eh_ub + 1 :])) / cols)

    def free_energy(sigma2: float) -> float:
        # Terms constant in σ² (the -log s_h² of every component) are dropped, so that
        # zero singular values (rank-deficient weights) stay finite.
        x = s2 / (cols * sigma2)
        big = x[x > x_bar]
        tau = 0.5 * (big - (1 + alpha) + np.sqrt((big - (1 + alpha)) ** 2 - 4 * alpha))
        return float(
            x.sum()
            + len(s) * math.log(cols * sigma2)
            + np.sum(np.log(tau + 1) - tau + alpha * np.log(tau / alpha + 1))
        )

    if not upper > lower > 0.0:
        sigma2 = upper
    else:
        sigma2 = float(
            scipy.optimize.minimize_scalar(free_energy, bounds=(lower, upper), method="bounded").x
        )
    threshold = math.sqrt(cols * sigma2 * x_bar)
    return int(np.sum(s > threshold))


# ---------------------------------------------------------------------- factorizations
def truncated_svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`U, s, Vᵀ` of a matrix in float64 (thin)."""
    return np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)


def weight_rel_error(weight: np.ndarray, approx: np.ndarray) -> float:
    """`||W - W'|| / ||W||` (Frobenius); 0 for a zero weight reproduced exactly."""
    w = np.asarray(weight, np.float64)
    den = float(np.linalg.norm(w))
    num = float(np.linalg.norm(w - np.asarray(approx, np.float64)))
    return num / den if den else (0.0 if num == 0.0 else float("inf"))


def whitened_factors(
    weight: np.ndarray, gram: np.ndarray, *, ridge: float = WHITEN_RIDGE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The data-aware SVD of SVD-LLM: factors of `W` (in x out) ordered by what they
    contribute to `X W` on the data whose `XᵀX` is `gram`.

    With `XᵀX + λI = L Lᵀ`, `||X (W - W')||` equals `||Lᵀ (W - W')||` (up to the ridge),
    so the truncated SVD `Lᵀ W = U Σ Vᵀ` gives the best rank-r fit in output space:
    `A = L⁻ᵀ U_r Σ_r^½`, `B = Σ_r^½ V_rᵀ`. At full rank `A B = W` exactly.

    Returns:
        `(a, s, b)`: `a` in x k, the singular values of `Lᵀ W` and `b` k x out (k = min
        dims); the caller keeps the first r columns of `a` and rows of `b`.
    """
    g = np.asarray(gram, np.float64)
    d = g.shape[0]
    lam = ridge * float(np.trace(g)) / max(d, 1)
    if lam <= 0.0:
        lam = ridge
    chol = scipy.linalg.cholesky(g + lam * np.eye(d), lower=True)
    u, s, vt = truncated_svd(chol.T @ np.asarray(weight, np.float64))
    root = np.sqrt(s)
    a = scipy.linalg.solve_triangular(chol.T, u * root, lower=False)
    return a, s, root[:, None] * vt


# ---------------------------------------------------------------------- chains of layers
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
    """

    factors: list[Factor]
    input_index: int
    ranks: dict[str, int]
    full_ranks: dict[str, int]
    params_before: int
    params_after: int
    weight_rel_error: float
    extra: dict[str, Any] = field(default_factory=dict)

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


def _replace(model: Model, node: Node, f: Factorization) -> list[Node]:
    """Swaps `node` for the chain; the chain's last factor takes over the output tensor."""
    x = node.inputs[f.input_index]
    out = node.outputs[0]
    dtype = out.dtype if out.dtype is not None else layer_weight(model, node)[1].dtype  # type: ignore[index]
    node.outputs.clear()
    nodes = build_chain(model, f.factors, x, out, hint=node.name, dtype=dtype)
    model.remove_nodes([node])
    return nodes


# ---------------------------------------------------------------------- calibration statistics
def _subset(data: Mapping[str, np.ndarray] | None, limit: int) -> dict[str, np.ndarray] | None:
    if not data:
        return None
    return {k: np.asarray(v)[:limit] for k, v in data.items()}


def channel_axis(model: Model, node: Node) -> int | None:
    """The output channel axis of a layer: 1 for Conv/ConvTranspose, -1 for Gemm and
    `x @ W`, -2 for `W @ x`; None for other ops."""
    if node.op in ("Conv", "ConvTranspose"):
        return 1
    if node.op == "Gemm":
        return -1
    if node.op == "MatMul":
        found = layer_weight(model, node)
        return -2 if found is not None and found[0] == 0 else -1
    return None


class _ChannelSums:
    """A `capture` reducer keeping per-channel sums (and counts) instead of activations."""

    def __init__(self, axes: Mapping[str, int]):
        self.axes = dict(axes)
        self.counts: dict[str, int] = defaultdict(int)
        self.ndim: dict[str, int] = {}

    def __call__(self, name: str, batch: np.ndarray) -> np.ndarray:
        axis = self.axes[name] % batch.ndim
        self.ndim[name] = batch.ndim
        moved = np.moveaxis(np.asarray(batch, np.float64), axis, -1)
        channels = moved.shape[-1]
        self.counts[name] += moved.size // max(channels, 1)
        return moved.reshape(-1, channels).sum(axis=0)[None, :]

    def means(self, gathered: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: gathered[n].sum(axis=0) / max(self.counts[n], 1) for n in self.axes}


class _PairErrors:
    """A `capture` reducer accumulating `||cand - ref||²` and `||ref||²` over pairs of
    tensors, batch by batch, without keeping the activations."""

    def __init__(self, pairs: Mapping[str, str]):
        self.partner: dict[str, tuple[str, bool]] = {}
        for ref, cand in pairs.items():
            self.partner[ref] = (cand, True)
            self.partner[cand] = (ref, False)
        self.stash: dict[str, np.ndarray] = {}
        self.num: dict[str, float] = defaultdict(float)
        self.den: dict[str, float] = defaultdict(float)

    def __call__(self, name: str, batch: np.ndarray) -> np.ndarray:
        other, is_ref = self.partner[name]
        if other not in self.stash:
            self.stash[name] = batch
            return _EMPTY
        mate = self.stash.pop(other)
        ref, cand = (batch, mate) if is_ref else (mate, batch)
        ref64 = np.asarray(ref, np.float64)
        key = name if is_ref else other
        self.num[key] += float(np.sum((np.asarray(cand, np.float64) - ref64) ** 2))
        self.den[key] += float(np.sum(ref64**2))
        return _EMPTY

    def rel(self, ref: str) -> float:
        num, den = math.sqrt(self.num[ref]), math.sqrt(self.den[ref])
        return num / den if den else (0.0 if num == 0.0 else float("inf"))


class _Grams:
    """A `capture` reducer accumulating `XᵀX` of layer inputs (rows: features last, or
    features second-to-last for `W @ x`)."""

    def __init__(self, wanted: Mapping[str, set[bool]]):
        self.wanted = {k: set(v) for k, v in wanted.items()}
        self.grams: dict[tuple[str, bool], np.ndarray] = {}
        self.rows: dict[tuple[str, bool], int] = defaultdict(int)

    def __call__(self, name: str, batch: np.ndarray) -> np.ndarray:
        for features_first in self.wanted[name]:
            x = np.asarray(batch, np.float64)
            if features_first and x.ndim >= 2:
                x = np.swapaxes(x, -1, -2)
            x = x.reshape(-1, x.shape[-1])
            key = (name, features_first)
            g = x.T @ x
            self.grams[key] = self.grams[key] + g if key in self.grams else g
            self.rows[key] += x.shape[0]
        return _EMPTY


def input_grams(
    model: Model, wanted: Mapping[str, set[bool]], data: Mapping[str, np.ndarray]
) -> tuple[dict[tuple[str, bool], np.ndarray], dict[tuple[str, bool], int]]:
    """`XᵀX` and row counts of the named activations on the data, in runs that keep the
    float64 Grams under a memory budget.

    Args:
        wanted: tensor name -> orientations (`True`: features on the second-to-last axis,
            the `x` of `W @ x`).
    """
    cost: dict[str, int] = {}
    for name, orientations in wanted.items():
        shape = model.shape(model.tensor(name)) or []
        cost[name] = 0
        for features_first in orientations:
            dim = shape[-2 if features_first else -1] if len(shape) >= 2 else 1
            cost[name] += 8 * (dim if isinstance(dim, int) and dim > 0 else 1) ** 2
    grams: dict[tuple[str, bool], np.ndarray] = {}
    rows: dict[tuple[str, bool], int] = {}
    batch: dict[str, set[bool]] = {}
    used = 0
    names = sorted(wanted)
    for i, name in enumerate(names):
        batch[name] = wanted[name]
        used += cost[name]
        if used >= _GRAM_BUDGET or i == len(names) - 1:
            reducer = _Grams(batch)
            capture(model, data, sorted(batch), batch_size=_CAPTURE_BATCH, reduce=reducer)
            grams.update(reducer.grams)
            rows.update(reducer.rows)
            batch, used = {}, 0
    return grams, rows


def _sample_bytes(model: Model, name: str) -> int:
    """Bytes of one sample of an activation (1 MiB when its shape is not static)."""
    try:
        shape = model.static_shape(model.tensor(name), batch=1)
    except (DynamicShapeError, KeyError):
        return 1 << 20
    return 4 * math.prod(shape)


def _capture_units(
    model: Model,
    data: Mapping[str, np.ndarray],
    units: Sequence[Sequence[str]],
    costs: Sequence[int],
    reduce: Any,
) -> dict[str, np.ndarray]:
    """`capture` of many tensors in runs whose outputs stay under a memory budget; the
    names of one unit (a tensor and its partner) are always captured together."""
    out: dict[str, np.ndarray] = {}
    chunk: list[str] = []
    used = 0
    for unit, cost in zip(units, costs, strict=True):
        cost *= _CAPTURE_BATCH
        if chunk and used + cost > _CAPTURE_BUDGET:
            out.update(capture(model, data, chunk, batch_size=_CAPTURE_BATCH, reduce=reduce))
            chunk, used = [], 0
        chunk.extend(unit)
        used += cost
    if chunk:
        out.update(capture(model, data, chunk, batch_size=_CAPTURE_BATCH, reduce=reduce))
    return out


def _capture_each(
    model: Model, data: Mapping[str, np.ndarray], names: Sequence[str], reduce: Any
) -> dict[str, np.ndarray]:
    return _capture_units(
        model, data, [[n] for n in names], [_sample_bytes(model, n) for n in names], reduce
    )


# ---------------------------------------------------------------------- bias correction
@dataclass
class BiasShift:
    """One bias correction: `delta` (per channel, along `axis` of `tensor`) was added to
    the bias or constant of `node`, which grew by `added_params` (a bias created where
    there was none)."""

    tensor: str
    axis: int
    delta: np.ndarray
    node: str
    added_params: int = 0


def _levels(model: Model, tensors: set[str]) -> dict[str, int]:
    """Level of each listed tensor: 0 when no other listed tensor is upstream of it, else
    1 + the largest level upstream. Tensors of one level do not depend on each other's
    corrections, so they are measured in the same run."""
    reach: dict[str, int] = {}
    levels: dict[str, int] = {}
    for node in model.nodes:
        upstream = max((reach.get(t.name, -1) for t in node.inputs), default=-1)
        for o in node.outputs:
            if o.name in tensors:
                levels[o.name] = upstream + 1
                reach[o.name] = upstream + 1
            else:
                reach[o.name] = upstream
    return levels


def _delta_shape(delta: np.ndarray, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along a negative `axis`."""
    return (delta.size,) + (1,) * (-axis - 1)


def _apply_shift(
    model: Model, tensor_name: str, axis: int, ndim: int, delta: np.ndarray
) -> tuple[str, int]:
    """Adds `delta` to what produces `tensor_name` (of rank `ndim`) per channel along the
    negative `axis`; returns the name of the node shifted and the parameters added."""
    tensor = model.tensor(tensor_name)
    node = model.producer(tensor)
    assert node is not None
    if node.op == "MatMul" and not model.is_graph_output(tensor) and len(tensor.outputs) == 1:
        # A MatMul exported with its bias as the next Add: shift that Add's constant.
        add = tensor.outputs[0]
        if add.op == "Add" and sum(t is tensor for t in add.inputs) == 1:
            other = add.inputs[1] if add.inputs[0] is tensor else add.inputs[0]
            value = model.constant_value(other)
            if value is not None and np.issubdtype(value.dtype, np.floating):
                shifted = value.astype(np.float64) + delta.reshape(_delta_shape(delta, axis))
                # A constant of higher rank than the activation would change the Add's shape.
                if shifted.ndim <= ndim:
                    const = model.add_constant(
                        f"{add.name}_bias_corrected", shifted.astype(value.dtype)
                    )
                    add.inputs[add.inputs.index(other)] = const
                    return add.name, int(shifted.size - value.size)
    if node.op in ("Conv", "ConvTranspose"):
        present = len(node.inputs) > 2 and not node.inputs[2].is_empty()
        bias = model.constant_value(node.inputs[2]) if present else None
        if not present or bias is not None:
            dtype = bias.dtype if bias is not None else (tensor.dtype or np.float32)
            base = np.zeros(delta.size) if bias is None else bias.astype(np.float64).reshape(-1)
            const = model.add_constant(f"{node.name}_bias_corrected", (base + delta).astype(dtype))
            if len(node.inputs) > 2:  # present, or an empty name standing for "absent"
                node.inputs[2] = const
            else:
                node.inputs.append(const)
            return node.name, 0 if bias is not None else int(delta.size)
    if node.op == "Gemm":
        present = len(node.inputs) > 2 and not node.inputs[2].is_empty()
        bias = model.constant_value(node.inputs[2]) if present else None
        if not present or bias is not None:
            beta = float(node.attrs.get("beta", 1.0))
            dtype = bias.dtype if bias is not None else (tensor.dtype or np.float32)
            # Broadcasting keeps every legal C shape legal: (N,), (1, N), (M, 1), (M, N), ().
            new = delta if bias is None else beta * bias.astype(np.float64) + delta
            const = model.add_constant(f"{node.name}_bias_corrected", new.astype(dtype))
            if len(node.inputs) > 2:  # present, or an empty name standing for "absent"
                node.inputs[2] = const
            else:
                node.inputs.append(const)
            node.attrs["beta"] = 1.0
            return node.name, int(new.size - (0 if bias is None else bias.size))
    # Anything else (a MatMul, a bias computed at run time): an Add after the node, which
    # takes over the tensor so that its name (maybe a graph output) is kept.
    dtype = tensor.dtype or np.float32
    inner = Variable(model.unique_name(f"{tensor_name}_uncorrected"), dtype=dtype)
    node.outputs[node.outputs.index(tensor)] = inner
    const = model.add_constant(
        f"{node.name}_bias_correction", delta.reshape(_delta_shape(delta, axis)).astype(dtype)
    )
    attrs = {"broadcast": 1} if model.opset < 7 else {}
    add = model.add_node(
        "Add", [inner, const], name=f"{node.name}_bias_correction", attrs=attrs, outputs=[tensor]
    )
    model.toposort()
    return add.name, int(delta.size)


def correct_bias(
    before: Model,
    after: Model,
    pairs: Mapping[str, str],
    calibration: Mapping[str, np.ndarray],
    *,
    axes: Mapping[str, int] | None = None,
    max_samples: int = MAX_SAMPLES,
) -> dict[str, BiasShift]:
    """Empirical bias correction: shifts each listed output of `after` per channel so that
    its mean over the calibration data equals the same tensor's mean in `before`.

    Layers are corrected in dependency order (a layer is measured after every corrected
    layer upstream of it has been shifted), so errors that propagate are not corrected
    twice. The shift goes into the bias of the producing Conv/ConvTranspose/Gemm
    (created when absent), into the constant of the Add that carries a MatMul's bias, or
    else into a new Add after the producer. `after` is edited in place; constants are
    replaced, never mutated, so weights shared with other nodes stay as they were.

    Args:
        before: the reference model (not modified).
        after: the perturbed model (factorized, quantized, ...), same inputs.
        pairs: tensor of `after` -> tensor of `before` it should match.
        calibration: arrays named like the models' inputs.
        axes: channel axis per tensor of `after`; by default from its producer (see
            :func:`channel_axis`), required for producers that are not layers.
        max_samples: calibration samples used.

    Returns:
        The shifts applied, by tensor of `after`.
    """
    data = _subset(calibration, max_samples)
    if not data or not pairs:
        return {}
    resolved: dict[str, int] = {}
    for name in pairs:
        axis = (axes or {}).get(name)
        if axis is None:
            producer = after.producer(after.tensor(name))
            axis = channel_axis(after, producer) if producer is not None else None
        if axis is None:
            raise ValueError(f"correct_bias: no channel axis known for tensor {name!r}")
        resolved[name] = axis
    ref_axes = {pairs[n]: resolved[n] for n in pairs}
    ref_sums = _ChannelSums(ref_axes)
    ref_means = ref_sums.means(_capture_each(before, data, sorted(ref_axes), ref_sums))
    levels = _levels(after, set(pairs))
    shifts: dict[str, BiasShift] = {}
    for level in sorted(set(levels.values())):
        names = sorted(n for n in pairs if levels.get(n) == level)
        sums = _ChannelSums({n: resolved[n] for n in names})
        means = sums.means(_capture_each(after, data, names, sums))
        for name in names:
            delta = ref_means[pairs[name]] - means[name]
            axis = resolved[name]
            if axis >= 0:  # negative axes broadcast whatever the batch rank
                axis -= sums.ndim[name]
            if axis < -sums.ndim[name]:
                logger.info("correct_bias: %s has no axis %d, left as is", name, axis)
                continue
            node, added = _apply_shift(after, name, axis, sums.ndim[name], delta)
            shifts[name] = BiasShift(name, axis, delta, node, added)
    after.cleanup()
    return shifts


def local_output_errors(
    original: Model,
    plans: Sequence[tuple[str, Factorization]],
    data: Mapping[str, np.ndarray],
    shifts: Mapping[str, BiasShift],
) -> dict[str, float]:
    """Output relative error `||y' - y|| / ||y||` of each replaced layer on its own inputs:
    each chain (with its bias shift) runs beside the original layer, reading the original
    model's activations, so a layer's figure does not include upstream errors."""
    probe = original.copy()
    pairs: dict[str, str] = {}
    names: dict[str, str] = {}
    for name, f in plans:
        node = probe.node(name)
        ref = node.outputs[0]
        dtype = ref.dtype if ref.dtype is not None else np.float32
        out = Variable(probe.unique_name(f"{ref.name}_lowrank"), dtype=dtype)
        build_chain(
            probe, f.factors, node.inputs[f.input_index], out, hint=f"{name}_probe", dtype=dtype
        )
        shift = shifts.get(ref.name)
        if shift is not None:
            const = probe.add_constant(
                f"{name}_probe_shift",
                shift.delta.reshape(_delta_shape(shift.delta, shift.axis)).astype(dtype),
            )
            attrs = {"broadcast": 1} if probe.opset < 7 else {}
            out = probe.add_node(
                "Add", [out, const], name=f"{name}_probe_shift", attrs=attrs, dtype=dtype
            ).outputs[0]
        pairs[ref.name] = out.name
        names[name] = ref.name
    probe.toposort()
    errors = _PairErrors(pairs)
    units = [[ref, cand] for ref, cand in pairs.items()]
    costs = [2 * _sample_bytes(original, ref) for ref in pairs]
    _capture_units(probe, data, units, costs, errors)
    return {name: errors.rel(ref) for name, ref in names.items()}


# ---------------------------------------------------------------------- the driver
class LowRankPass(Pass):
    """Base of the factorization passes.

    Subclasses set `ops`, and implement :meth:`applicable` (structural reasons not to
    apply) and :meth:`factorize`; :meth:`statistics` may gather calibration statistics
    first. Layers are factored independently from the input model's weights and spliced
    in together; with calibration data biases are then corrected (`bias_correction`) and
    each layer's output error is measured on its own inputs.
    """

    ops: ClassVar[tuple[str, ...]] = ()
    lossless = False

    def applicable(self, model: Model, node: Node) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def factorize(
        self, model: Model, node: Node, stats: Any
    ) -> Factorization | str:  # pragma: no cover - abstract
        raise NotImplementedError

    def statistics(
        self, model: Model, nodes: list[Node], data: Mapping[str, np.ndarray] | None
    ) -> tuple[dict[str, Any], list[str]]:
        """Per-layer statistics for :meth:`factorize`, and messages for the change list."""
        return {}, []

    def _common(self, model: Model, node: Node) -> str | None:
        found = layer_weight(model, node)
        assert found is not None
        weight = node.inputs[found[0]]
        readers = [n for n in weight.outputs if n is not node]
        if readers:
            return (
                f"its weight {weight.name} is shared with {len(readers)} other node(s); "
                "factorizing one reader would duplicate it"
            )
        return self.applicable(model, node)

    def run(self, model: Model, context: PassContext) -> PassResult:
        refresh_shapes(model)
        data = _subset(context.calibration, MAX_SAMPLES)
        notes: dict[str, dict[str, Any]] = {}
        candidates = []
        for node in list(model.nodes):
            if node.op not in self.ops or not is_layer_node(model, node):
                continue
            if not self.selects(model, node):
                continue
            why = self._common(model, node)
            if why is not None:
                notes[node.name] = {"skipped": why}
                continue
            candidates.append(node)
        stats, messages = self.statistics(model, candidates, data)
        plans: list[tuple[Node, Factorization]] = []
        for node in candidates:
            found = self.factorize(model, node, stats.get(node.name))
            if isinstance(found, str):
                notes[node.name] = {"skipped": found}
                continue
            if not self.config.get("force", False) and found.params_after >= found.params_before:
                notes[node.name] = {
                    "skipped": f"{found.describe()} gives {found.params_after:,} params, "
                    f"not fewer than {found.params_before:,}"
                }
                continue
            plans.append((node, found))
        if not plans:
            logger.info("%s: nothing to factorize", self.name)
            return PassResult(model, False, messages, notes)
        original = model.copy()
        before = summarize(model)
        for node, f in plans:
            _replace(model, node, f)
        model.cleanup()
        refresh_shapes(model)
        named = [(node.name, f) for node, f in plans]
        outputs = {name: original.node(name).outputs[0].name for name, _ in named}
        shifts: dict[str, BiasShift] = {}
        if data is not None and self.config["bias_correction"]:
            shifts = correct_bias(original, model, {t: t for t in outputs.values()}, data)
            refresh_shapes(model)
        errors = local_output_errors(original, named, data, shifts) if data is not None else {}
        after = summarize(model)
        changes = [
            f"{self.name}: factorized {len(plans)} layer(s), model params "
            f"{before.params:,} -> {after.params:,}",
            *messages,
        ]
        for name, f in named:
            note: dict[str, Any] = {
                **({"rank": f.ranks["rank"]} if set(f.ranks) == {"rank"} else {"ranks": f.ranks}),
                "full_rank": f.full_ranks["rank"]
                if set(f.full_ranks) == {"rank"}
                else f.full_ranks,
                "params_before": f.params_before,
                "params_after": f.params_after,
                "weight_rel_error": f.weight_rel_error,
                **f.extra,
            }
            text = f"weight rel. error {f.weight_rel_error:.2e}"
            if name in errors:
                note["output_rel_error"] = errors[name]
                text = f"output rel. error {errors[name]:.2e}, {text}"
            shift = shifts.get(outputs[name])
            if shift is not None:
                # A bias created by the correction is part of the layer's cost.
                note["params_after"] += shift.added_params
            if data is not None:
                note["bias_corrected"] = shift is not None
            notes[name] = note
            changes.append(
                f"{self.name} {name}: {f.describe()}, {f.params_before:,} -> "
                f"{note['params_after']:,} params, {text}"
            )
        if data is None and self.config["bias_correction"]:
            changes.append(
                "no calibration data: biases not corrected and errors measured on the weights "
                "(pass --data FILE.npz to correct biases and measure output errors)"
            )
        return PassResult(model, True, changes, notes)
