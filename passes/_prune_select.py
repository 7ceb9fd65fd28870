"""Channel selection by least squares: the channels whose loss the next layers can best
make up for once they are re-fitted.

Norm criteria rank a channel by its own filter; what matters after reconstruction is how
well the layers that read the group can reproduce their outputs from the channels that
stay. This is the channel-selection step of He et al. (ICCV 2017) in the greedy form of
ThiNet (Luo et al., ICCV 2017), made exact for the least-squares re-fit that follows: on
calibration data each reading layer is a linear system `Y ≈ X W + b`; with `P` the
inverse of the (ridge-regularised, centred) Gram matrix of `X` and `W = P Xᵀ Y` its
best fit, removing the input features `S` raises the residual by
`tr(W_Sᵀ (P_SS)⁻¹ W_S)` (the block form of the leave-out identity), and `P` and `W`
downdate in closed form. Backward elimination removes, step by step, the channel whose
features cost least, summed over the reading layers (each normalised by its output
energy).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tailor.ir.activations import capture
from tailor.ir.dependency import ChannelGroup
from tailor.ir.model import Model
from tailor.passes._prune_refit import _RIDGE, _batch_size, _Collector, _Fit, _fit_spec

__all__ = ["Normal", "gather_normals", "elimination_scores"]

logger = logging.getLogger(__name__)

#: Bound on the Gram matrices held at once (entries); more readers take more model runs.
_GRAM_ENTRIES = 60_000_000
#: Backward elimination takes at most this many steps (wide groups drop several per step).
_MAX_STEPS = 64


@dataclass
class Normal:
    """The centred normal equations of one reading layer on calibration data."""

    gram: np.ndarray  # [d, d] Σ (x - x̄)(x - x̄)ᵀ
    cross: np.ndarray  # [d, k] Σ (x - x̄)(y - ȳ)ᵀ
    energy: float  # Σ ||y - ȳ||²
    channel: np.ndarray  # [d] the layer's input channel (feature index) each column reads


class _Sums:
    """Running sums of one layer's rows, folded as soon as a batch has both sides."""

    def __init__(self, fit: _Fit, per_channel: int):
        self.fit, self.per_channel = fit, per_channel
        self.n = 0
        self.sx = self.sy = self.sxx = self.sxy = None
        self.syy = 0.0

    def fold(self) -> None:
        fit = self.fit
        while fit.x and fit.y:
            x = fit.x.pop(0).reshape(len(fit.y[0]), -1).astype(np.float64)
            y = fit.y.pop(0).astype(np.float64)
            fit.samples.clear()
            if self.sxx is None:
                self.sx, self.sy = x.sum(0), y.sum(0)
                self.sxx, self.sxy = x.T @ x, x.T @ y
            else:
                self.sx += x.sum(0)
                self.sy += y.sum(0)
                self.sxx += x.T @ x
                self.sxy += x.T @ y
            self.syy += float((y * y).sum())
            self.n += len(x)

    def normal(self) -> Normal | None:
        if not self.n or self.sxx is None:
            return None
        mx, my = self.sx / self.n, self.sy / self.n
        gram = self.sxx - self.n * np.outer(mx, mx)
        cross = self.sxy - self.n * np.outer(mx, my)
        energy = self.syy - self.n * float(my @ my)
        channel = np.arange(gram.shape[0]) // self.per_channel
        return Normal(gram, cross, energy, channel)


def _readable(model: Model, name: str, index: int) -> tuple[_Fit, int] | None:
    """The fit spec of a reading layer this selection models, and features per channel."""
    node = model.node(name)
    if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
        return None  # grouped readers split their inputs: their channels are not free
    spec = _fit_spec(model, name, index, None)
    if isinstance(spec, str):
        return None
    per_channel = math.prod(spec.conv[0]) if spec.conv is not None else 1
    return spec, per_channel


def gather_normals(
    model: Model, names: list[str], data: Mapping[str, np.ndarray], seed: int
) -> dict[str, Normal]:
    """Normal equations of the named reading layers, from the model's own activations.

    Layers this selection cannot model (grouped convolutions, and whatever the re-fit
    itself refuses) are left out of the result.
    """
    feeds = {k: np.asarray(v) for k, v in data.items()}
    total = len(next(iter(feeds.values())))
    chosen: list[tuple[_Fit, int]] = []
    for index, name in enumerate(names):
        found = _readable(model, name, index)
        if found is not None:
            chosen.append(found)
    out: dict[str, Normal] = {}
    # Chunks of readers whose Gram matrices fit the budget, one model run per chunk.
    chunk: list[tuple[_Fit, int]] = []
    size = 0
    for fit, per in chosen:
        if chunk and size + fit.features**2 > _GRAM_ENTRIES:
            out.update(_gather_chunk(model, feeds, chunk, total, seed))
            chunk, size = [], 0
        chunk.append((fit, per))
        size += fit.features**2
    if chunk:
        out.update(_gather_chunk(model, feeds, chunk, total, seed))
    return out


def _gather_chunk(
    model: Model,
    feeds: dict[str, np.ndarray],
    chunk: list[tuple[_Fit, int]],
    total: int,
    seed: int,
) -> dict[str, Normal]:
    sums = [_Sums(fit, per) for fit, per in chunk]
    fits = [s.fit for s in sums]
    xs, ys = _Collector(fits, "x", total, seed), _Collector(fits, "y", total, seed)
    by_tensor: dict[str, list[_Sums]] = {}
    for s in sums:
        by_tensor.setdefault(s.fit.x_name, []).append(s)
        by_tensor.setdefault(s.fit.y_name, []).append(s)

    def reduce(name: str, batch: np.ndarray) -> np.ndarray:
        xs(name, batch)
        ys(name, batch)
        for s in by_tensor.get(name, []):
            s.fold()
        return np.empty((0,))

    capture(model, feeds, sorted(by_tensor), reduce=reduce, batch_size=_batch_size(model))
    out = {}
    for s in sums:
        normal = s.normal()
        if normal is not None:
            out[s.fit.name] = normal
    return out


def _solve_state(normal: Normal) -> tuple[np.ndarray, np.ndarray]:
    """(P, W): the inverse regularised Gram matrix and the least-squares weights."""
    d = normal.gram.shape[0]
    lam = _RIDGE * max(float(np.trace(normal.gram)) / d, 1e-12)
    p = np.linalg.inv(normal.gram + lam * np.eye(d))
    return p, p @ normal.cross


class _System:
    """One reader's least-squares system while channels are removed.

    The inverse Gram matrix `P` after removing feature sets f_1..f_t is
    `P0 - U K` (each removal a Schur-complement downdate by `P[:, f] P[f, f]^-1 P[f, :]`),
    kept in that factored form: a step then reads only the columns and diagonal blocks it
    needs, in O(d r |f|), instead of rewriting the whole d x d matrix (memory-bound, and
    most of the pass's time on layers with thousands of input features). The weights `W`
    (d x k, small) are updated in place.
    """

    def __init__(self, normal: Normal, where: list[np.ndarray]):
        self.p0, self.w = _solve_state(normal)
        self.where = where
        self.energy = normal.energy
        d = self.p0.shape[0]
        # U and K^T, filled column by column as features go (at most d of them).
        self._u = np.empty((d, d))
        self._kt = np.empty((d, d))
        self.rank = 0
        self.dead = np.zeros(d, bool)

    @property
    def u(self) -> np.ndarray:
        return self._u[:, : self.rank]

    @property
    def kt(self) -> np.ndarray:
        return self._kt[:, : self.rank]

    def columns(self, f: np.ndarray) -> np.ndarray:
        """P[:, f], exactly zero on removed features (rows of the symmetric P0 and of K^T
        are gathered: contiguous, unlike columns)."""
        cols = self.p0[f].T - self.u @ self.kt[f].T
        cols[self.dead] = 0.0
        return cols

    def add_costs(self, cost: np.ndarray, alive: np.ndarray) -> None:
        """Adds, per alive channel, the residual its removal would add (over the energy)."""
        by_width: dict[int, list[int]] = {}
        for c in np.flatnonzero(alive):
            if len(self.where[c]):
                by_width.setdefault(len(self.where[c]), []).append(int(c))
        for channels in by_width.values():
            idx = np.stack([self.where[c] for c in channels])  # [n, m]
            blocks = self.p0[idx[:, :, None], idx[:, None, :]]  # [n, m, m]
            if self.rank:
                blocks = blocks - np.einsum("nmr,nlr->nml", self.u[idx], self.kt[idx])
            ws = self.w[idx]  # [n, m, k]
            cost[channels] += np.einsum("nmk,nmk->n", ws, np.linalg.solve(blocks, ws)) / self.energy

    def remove(self, channels: np.ndarray) -> None:
        f = np.concatenate([self.where[c] for c in channels])
        for c in channels:
            self.where[c] = self.where[c][:0]
        if not len(f):
            return
        pf = self.columns(f)
        k = np.linalg.solve(pf[f], np.concatenate([pf.T, self.w[f]], axis=1))
        d = pf.shape[0]
        self.w -= pf @ k[:, d:]
        self.dead[f] = True
        self.w[self.dead] = 0.0
        r, n = self.rank, len(f)
        self._u[:, r : r + n] = pf
        self._kt[:, r : r + n] = k[:, :d].T
        self.rank += n


def elimination_scores(
    group: ChannelGroup, normals: Mapping[str, Normal], drop: int
) -> np.ndarray | None:
    """Scores over the group's channels (low = remove first), or None without readers.

    The first `drop` channels removed score 0, 1, ... in the order they went; the rest
    score above them, ranked by what removing each would still cost.
    """
    systems = []
    for name, labels in group.consumers.items():
        normal = normals.get(name)
        if normal is None or normal.energy <= 0:
            continue
        feature_label = np.asarray(labels)[normal.channel]
        if not (feature_label >= 0).any():
            continue
        where = [np.flatnonzero(feature_label == c) for c in range(group.size)]
        systems.append(_System(normal, where))
    if not systems:
        return None
    alive = np.ones(group.size, bool)
    scores = np.full(group.size, float(drop), np.float64)
    removed = 0
    steps = 0
    while True:
        cost = np.zeros(group.size)
        for system in systems:
            system.add_costs(cost, alive)
        if removed >= drop:
            break
        candidates = np.flatnonzero(alive)
        per_step = max(1, math.ceil((drop - removed) / max(_MAX_STEPS - steps, 1)))
        go = candidates[
            np.argsort(cost[candidates], kind="stable")[: min(per_step, drop - removed)]
        ]
        for c in go:
            scores[c] = removed
            removed += 1
            alive[c] = False
        for system in systems:
            system.remove(go)
        steps += 1
    # What is left ranks above everything removed, cheapest to lose first.
    rest = np.flatnonzero(alive)
    order = rest[np.argsort(cost[rest], kind="stable")]
    scores[order] = drop + np.arange(len(order))
    return scores
