"""Tests of the search strategies, on synthetic problems whose optimum brute force finds.

:class:`Synthetic` is a problem of `n` units with four options each (keep, prune 30 %,
prune 60 %, int8): latency and storage savings and accuracy losses add up per unit, plus
one interaction (pruning units 0 and 1 together costs extra accuracy), so every
assignment's metrics are known in closed form and the best plan under a budget is found
by enumerating them all.
"""

from __future__ import annotations

import itertools

import numpy as np

from tailor.demands import Demands, Normalizer
from tailor.search.base import Evaluation, Option, Scorer, Unit

__all__ = ["Synthetic", "brute_force", "true_score"]

OPTIONS = (
    Option("keep", None, 0.0),
    Option("prune(ratio=0.3)", {"ratio": 0.3}, 0.3),
    Option("prune(ratio=0.6)", {"ratio": 0.6}, 0.6),
    Option("quantize(int8)", {"mode": "int8"}, 0.5),
)


class Synthetic:
    """Additive latency/storage savings and accuracy losses with one interaction term.

    Args:
        n: units.
        seed: draws each unit's latency, storage and per-option losses.
        deceptive: prune 60 % (the biggest latency saving) costs 1.5-3 points on most
            units, but nearly nothing on every third unit: only the units' identity
            tells the good from the bad.
        fail: assignments (or a predicate) that come back as errors.
    """

    def __init__(self, n: int = 6, seed: int = 0, *, deceptive: bool = False, fail=None):
        rng = np.random.default_rng(seed)
        self.n = n
        self.latency = rng.uniform(1.0, 5.0, n)  # ms per unit
        self.storage = rng.uniform(1e5, 1e6, n)  # bytes per unit
        # Fractions of a unit's latency / storage that each option removes.
        self.lat_saving = np.array([0.0, 0.3, 0.6, 0.35])
        self.sto_saving = np.array([0.0, 0.3, 0.6, 0.75])
        loss = np.zeros((n, 4))
        loss[:, 1] = rng.uniform(0.0, 0.004, n)
        loss[:, 2] = rng.uniform(0.004, 0.02, n)
        loss[:, 3] = rng.uniform(0.0, 0.003, n)
        if deceptive:
            loss[:, 2] = rng.uniform(0.015, 0.03, n)
            loss[::3, 2] = rng.uniform(0.0, 0.001, len(loss[::3]))
        self.loss = loss
        self.interaction = 0.006
        self.fail = fail
        self.calls: list[tuple[int, ...]] = []
        self.units = [
            Unit(
                f"unit{i}",
                list(OPTIONS),
                np.array([self.latency[i], self.storage[i] / 1e6, i % 3, (i * 7) % 5]),
            )
            for i in range(n)
        ]
        self.baseline = self.metrics((0,) * n)

    def metrics(self, a: tuple[int, ...]) -> dict[str, float]:
        idx = np.array(a)
        rows = np.arange(self.n)
        acc = 0.9 - self.loss[rows, idx].sum()
        if a[0] in (1, 2) and a[1] in (1, 2):
            acc -= self.interaction
        return {
            "accuracy": float(acc),
            "latency": float((self.latency * (1 - self.lat_saving[idx])).sum()),
            "storage": float((self.storage * (1 - self.sto_saving[idx])).sum()),
            "energy": float((self.latency * (1 - self.lat_saving[idx])).sum() * 2.0),
        }

    def evaluate(self, assignments: list[tuple[int, ...]]) -> list[Evaluation]:
        out = []
        for a in assignments:
            self.calls.append(tuple(a))
            bad = self.fail(a) if callable(self.fail) else a in (self.fail or ())
            if bad:
                out.append(Evaluation(None, f"pass failed on {a}", 0.01))
            else:
                out.append(Evaluation(self.metrics(tuple(a)), None, 0.01))
        return out

    def normalizer(self) -> Normalizer:
        """The min-max range of every metric over the whole space (in closed form)."""
        worst = self.loss.max(axis=1).sum() + self.interaction
        strongest = [(2,) * self.n, (3,) * self.n]
        low = {
            k: min(self.metrics(a)[k] for a in strongest) for k in ("latency", "storage", "energy")
        }
        high = dict(self.baseline)
        low["accuracy"] = float(0.9 - worst)
        return Normalizer(low, high)

    def everything(self) -> list[tuple[tuple[int, ...], dict[str, float]]]:
        return [(a, self.metrics(a)) for a in itertools.product(range(4), repeat=self.n)]


def _fixed_scorer(problem: Synthetic, demands: Demands) -> Scorer:
    """A scorer whose normaliser spans the whole space, so scores compare across runs."""
    return Scorer(demands, problem.baseline, normalizer=problem.normalizer())


def true_score(problem: Synthetic, demands: Demands, metrics: dict[str, float]) -> float:
    """The score of `metrics` against the whole space's range (lower is better)."""
    return _fixed_scorer(problem, demands).score(metrics)


def brute_force(problem: Synthetic, demands: Demands) -> tuple[tuple[int, ...], float]:
    """The best assignment and its :func:`true_score`."""
    scorer = _fixed_scorer(problem, demands)
    return min(((a, scorer.score(m)) for a, m in problem.everything()), key=lambda p: p[1])
