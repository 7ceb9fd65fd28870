"""The search problem as strategies see it, how candidates are ranked, and the dispatch.

A **problem** is a list of *units* (a layer, or a coupled channel group of layers), each
with *options* (option 0 is always "keep"); an *assignment* is a tuple with one option
index per unit. The problem evaluates assignments in batches and returns metrics
(`accuracy`, higher is better; `latency` ms, `energy` mJ, `storage` and `peak_memory`
bytes, lower is better) or, for a candidate that failed, an error: failures are data,
never exceptions that stop the search.

Candidates are ranked by a :class:`Scorer`: plans that meet every budget come first,
ordered by the demands' weighted min-max objective (over everything seen so far); the
others follow, ordered by how far they miss the budgets, so the closest plan found is
always reportable. A strategy drives a :class:`SearchContext`, which owns the budget, the
progress callback, the history and a memo, so no assignment is evaluated twice.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tailor.demands import Demands, Normalizer
from tailor.errors import TailorError

__all__ = [
    "COST_METRICS",
    "STRATEGIES",
    "Assignment",
    "Option",
    "Unit",
    "Evaluation",
    "Problem",
    "Scorer",
    "Budget",
    "Progress",
    "SearchResult",
    "SearchContext",
    "SearchError",
    "active_costs",
    "pareto_front",
    "search",
]

logger = logging.getLogger(__name__)

#: Metrics that are costs (lower is better) and may carry a budget.
COST_METRICS = ("latency", "energy", "storage", "peak_memory")
_BUDGETS = {
    "latency": "max_latency_ms",
    "energy": "max_energy_mj",
    "storage": "max_storage_bytes",
    "peak_memory": "max_peak_memory_bytes",
}
#: The search strategies, by name: module of `tailor.search` with a `run(ctx, seed, ...)`.
STRATEGIES = ("greedy", "evolutionary", "rl")

Assignment = tuple[int, ...]
#: `(message, done, total)`: evaluations done so far, and the budget's total if it has one.
Progress = Callable[[str, int, "int | None"], None]


class SearchError(TailorError):
    """A search that cannot start: unknown strategy, bad budget or empty problem."""


@dataclass(frozen=True)
class Option:
    """One choice for a unit.

    Attributes:
        label: what it does, e.g. `prune(ratio=0.3)`, `tucker2(rank=0.5)+int8`, `keep`.
        payload: opaque to the search (the scheduler stores pass steps there).
        strength: how aggressive, in [0, 1]; 0 for keep.
    """

    label: str
    payload: Any = None
    strength: float = 0.0

    @property
    def family(self) -> str:
        """The technique family: the label up to its first `(` or `+`, stripped.

        `tucker2(rank=0.5)` and `tucker2(rank=0.5)+int8` are both `tucker2` (the
        composition is a stronger member of the family), `quantize(int8)` is `quantize`.
        """
        cut = [i for i in (self.label.find("("), self.label.find("+")) if i >= 0]
        return self.label[: min(cut)].strip() if cut else self.label.strip()


@dataclass(eq=False)
class Unit:
    """A decision of the search: a layer or a coupled channel group, and its options.

    Attributes:
        name: for messages and reports.
        options: option 0 is always keep.
        features: a numeric description of the unit (shape, MACs share, ...), the rl
            agent's state.
        share: the unit's share of the model's cost (MACs and parameters, 0 to 1): under
            a tight budget the larger units are measured first.
    """

    name: str
    options: list[Option]
    features: np.ndarray = field(default_factory=lambda: np.zeros(0))
    share: float = 0.0


@dataclass
class Evaluation:
    """The outcome of one candidate: metrics, or the error that stopped it."""

    metrics: dict[str, float] | None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.metrics is not None


@runtime_checkable
class Problem(Protocol):
    """What a strategy searches. An optional `thread_safe = True` lets `workers > 1`
    evaluate a batch from several threads."""

    units: list[Unit]
    baseline: dict[str, float]

    def evaluate(self, assignments: list[Assignment]) -> list[Evaluation]: ...


class Scorer:
    """Ranks metrics under demands: lower :meth:`score` is better.

    Feasible metrics score their objective (the demands' weights over a min-max
    normaliser of the baseline and everything :meth:`observe`-d, recomputed as points
    arrive, or over a fixed `normalizer`), in [0, sum of weights]. Infeasible ones score `1 + sum of weights +
    violation`, so they rank after every feasible one and among themselves by how far
    they miss the budgets; failures score infinity.
    """

    def __init__(
        self,
        demands: Demands,
        baseline: Mapping[str, float],
        *,
        normalizer: Normalizer | None = None,
    ):
        self.demands = demands
        self.baseline = dict(baseline)
        self.base_accuracy = float(self.baseline.get("accuracy", math.nan))
        self.penalty = 1.0 + float(sum(demands.weights.values()))
        self._rows: list[Mapping[str, float]] = [self.baseline]
        # A given normaliser stays fixed (scores then compare across searches).
        self._fixed = normalizer is not None
        self._normalizer: Normalizer | None = normalizer

    def observe(self, metrics: Mapping[str, float]) -> None:
        """Adds a point to the normaliser's range (unless the normaliser was given)."""
        if not self._fixed:
            self._rows.append(metrics)
            self._normalizer = None

    @property
    def normalizer(self) -> Normalizer:
        if self._normalizer is None:
            self._normalizer = Normalizer.over(self._rows)
        return self._normalizer

    def violations(self, metrics: Mapping[str, float]) -> list[str]:
        """Each budget broken, as the demands phrase it."""
        return self.demands.violations(metrics, self.base_accuracy)

    def feasible(self, metrics: Mapping[str, float]) -> bool:
        return not self.violations(metrics)

    def shortfalls(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """How far each budget is missed, relative to it (0 when met); accuracy relative
        to the baseline's."""
        out: dict[str, float] = {}
        floor = self.demands.accuracy_floor(self.base_accuracy)
        acc = metrics.get("accuracy")
        if floor is not None and acc is not None and not math.isnan(floor):
            out["accuracy"] = max(floor - acc, 0.0) / max(abs(self.base_accuracy), 1e-9)
        for key, attr in _BUDGETS.items():
            limit, value = getattr(self.demands, attr), metrics.get(key)
            if limit is not None and value is not None:
                out[key] = max(value - limit, 0.0) / limit
        return out

    def violation(self, metrics: Mapping[str, float]) -> float:
        """The sum of :meth:`shortfalls`: 0 exactly when every budget is met."""
        if self.feasible(metrics):
            return 0.0
        # A broken budget always counts, even when its relative miss rounds to zero.
        return max(sum(self.shortfalls(metrics).values()), 1e-12)

    def objective(self, metrics: Mapping[str, float], *, clip: bool = True) -> float:
        """The weighted normalised objective; `clip=False` extends the normaliser's line
        beyond the range seen (for predictions that leave it)."""
        if clip:
            return self.normalizer.objective(metrics, self.demands.weights)
        total, norm = 0.0, self.normalizer
        for key, w in self.demands.weights.items():
            value, lo, hi = metrics.get(key), norm.low.get(key), norm.high.get(key)
            if not w or value is None or lo is None or hi is None or hi <= lo:
                continue
            total += w * ((hi - value) if key == "accuracy" else (value - lo)) / (hi - lo)
        return total

    def score(self, metrics: Mapping[str, float] | None, *, clip: bool = True) -> float:
        """The ranking key (see the class); `clip` as in :meth:`objective`."""
        if metrics is None:
            return math.inf
        objective = self.objective(metrics, clip=clip)
        if self.feasible(metrics):
            return objective
        # The objective breaks ties between equally distant misses.
        return self.penalty + self.violation(metrics) + 1e-6 * objective


@dataclass(frozen=True)
class Budget:
    """When a search stops at the latest; None: no limit (each strategy has its own end)."""

    max_evaluations: int | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.max_evaluations is not None and self.max_evaluations < 0:
            raise SearchError(f"max evaluations {self.max_evaluations} must be zero or more")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise SearchError(f"max seconds {self.max_seconds} must be positive")


@dataclass
class SearchResult:
    """What a search found.

    Attributes:
        best: the best assignment by the :class:`Scorer` (all-keep if nothing beat it).
        metrics: its metrics.
        feasible: whether it meets every budget; if not, it is the closest plan found.
        unmet: the budgets it breaks, as phrases.
        front: (assignment, metrics) of the Pareto front of accuracy against the costs
            the demands care about, best accuracy first.
        history: every evaluation made, in order.
        evaluations: how many candidates were evaluated.
        seconds: wall time of the search.
        strategy: its name.
        ranked: every successfully evaluated assignment (all-keep included) with its
            metrics, best score first (what a confirmation on fresh data goes through).
    """

    best: Assignment
    metrics: dict[str, float]
    feasible: bool
    unmet: list[str]
    front: list[tuple[Assignment, dict[str, float]]]
    history: list[tuple[Assignment, Evaluation]]
    evaluations: int
    seconds: float
    strategy: str
    ranked: list[tuple[Assignment, dict[str, float]]] = field(default_factory=list)


def active_costs(demands: Demands, baseline: Mapping[str, float]) -> list[str]:
    """The cost metrics that matter to `demands` (a weight or a budget) and that the
    problem reports; latency when none does."""
    keys = [
        k
        for k in COST_METRICS
        if k in baseline
        and (demands.weights.get(k, 0.0) > 0 or getattr(demands, _BUDGETS[k]) is not None)
    ]
    return keys or [k for k in ("latency",) if k in baseline]


def pareto_front(
    points: Sequence[tuple[Assignment, Mapping[str, float]]], costs: Sequence[str]
) -> list[tuple[Assignment, dict[str, float]]]:
    """The points no other beats on accuracy and every cost in `costs`, best accuracy first."""
    keys = ["accuracy", *costs]
    rows = [(a, m) for a, m in points if all(m.get(k) is not None for k in keys)]
    vecs = np.array([[-m["accuracy"], *(m[k] for k in costs)] for _, m in rows], dtype=float)
    front = []
    for i, (a, m) in enumerate(rows):
        better = np.all(vecs <= vecs[i], axis=1) & np.any(vecs < vecs[i], axis=1)
        if not better.any():
            front.append((a, dict(m)))
    return sorted(front, key=lambda p: (-p[1]["accuracy"], p[0]))


class SearchContext:
    """A strategy's access to the problem: batched evaluation under the budget, a memo,
    history, progress and the scorer."""

    def __init__(
        self,
        problem: Problem,
        demands: Demands,
        *,
        budget: Budget | None = None,
        progress: Progress | None = None,
        workers: int = 1,
        label: str = "search",
    ):
        self.problem = problem
        self.units = list(problem.units)
        self.demands = demands
        self.scorer = Scorer(demands, problem.baseline)
        self.budget = budget or Budget()
        self.progress = progress
        self.workers = max(int(workers), 1)
        self.label = label
        self.phase = ""
        self.keep: Assignment = (0,) * len(self.units)
        self.costs = active_costs(demands, problem.baseline)
        self.history: list[tuple[Assignment, Evaluation]] = []
        self._memo: dict[Assignment, Evaluation] = {self.keep: Evaluation(dict(problem.baseline))}
        self._start = time.monotonic()

    @property
    def evaluations(self) -> int:
        return len(self.history)

    @property
    def remaining(self) -> int | None:
        if self.budget.max_evaluations is None:
            return None
        return max(self.budget.max_evaluations - self.evaluations, 0)

    @property
    def elapsed(self) -> float:
        """Seconds since the search started."""
        return time.monotonic() - self._start

    @property
    def exhausted(self) -> bool:
        if self.remaining == 0:
            return True
        limit = self.budget.max_seconds
        return limit is not None and time.monotonic() - self._start >= limit

    def lookup(self, assignment: Sequence[int]) -> Evaluation | None:
        """The evaluation of an assignment seen before (all-keep is the baseline)."""
        return self._memo.get(tuple(assignment))

    def replay(self, history: Sequence[tuple[Assignment, Evaluation]]) -> None:
        """Knows the evaluations of an earlier search (memo and normaliser) without
        counting them as this one's."""
        for a, ev in history:
            self._memo[tuple(a)] = ev
            if ev.metrics is not None:
                self.scorer.observe(ev.metrics)

    def metrics(self, assignment: Sequence[int]) -> dict[str, float] | None:
        found = self._memo.get(tuple(assignment))
        return found.metrics if found is not None else None

    def score(self, assignment: Sequence[int]) -> float:
        """The scorer's value of a seen assignment; infinity if unseen or failed."""
        return self.scorer.score(self.metrics(assignment))

    def _check(self, assignment: Sequence[int]) -> Assignment:
        a = tuple(int(c) for c in assignment)
        if len(a) != len(self.units) or any(
            not 0 <= c < len(u.options) for c, u in zip(a, self.units, strict=True)
        ):
            raise ValueError(f"assignment {a} does not fit the problem's units")
        return a

    def evaluate(self, assignments: Sequence[Sequence[int]]) -> list[Evaluation | None]:
        """Evaluates the new assignments of a batch (seen ones come from the memo), in
        chunks of `workers`, until the budget runs out; None for those left unevaluated."""
        batch = [self._check(a) for a in assignments]
        todo = list(dict.fromkeys(a for a in batch if a not in self._memo))
        while todo and not self.exhausted:
            room = self.remaining
            chunk = todo[: self.workers if room is None else min(self.workers, room)]
            todo = todo[len(chunk) :]
            for a, ev in zip(chunk, self._run(chunk), strict=True):
                self._memo[a] = ev
                self.history.append((a, ev))
                if ev.metrics is not None:
                    self.scorer.observe(ev.metrics)
                else:
                    logger.debug("candidate %s failed: %s", a, ev.error)
            if self.progress is not None:
                message = f"{self.label}: {self.phase}" if self.phase else self.label
                self.progress(message, self.evaluations, self.budget.max_evaluations)
        return [self._memo.get(a) for a in batch]

    def _run(self, chunk: list[Assignment]) -> list[Evaluation]:
        if len(chunk) > 1 and getattr(self.problem, "thread_safe", False):
            with ThreadPoolExecutor(len(chunk)) as pool:
                parts = list(pool.map(lambda a: self.problem.evaluate([a]), chunk))
            out = [p[0] for p in parts]
        else:
            out = list(self.problem.evaluate(chunk))
        if len(out) != len(chunk):
            raise RuntimeError(
                f"the problem returned {len(out)} evaluations for {len(chunk)} candidates"
            )
        return out

    def seen(self) -> list[tuple[Assignment, dict[str, float]]]:
        """Every successfully evaluated assignment (all-keep first) with its metrics."""
        return [(a, ev.metrics) for a, ev in self._memo.items() if ev.metrics is not None]

    def result(self, strategy: str) -> SearchResult:
        seen = self.seen()
        ranked = sorted(seen, key=lambda p: self.scorer.score(p[1]))  # stable: first wins ties
        best, metrics = ranked[0]
        return SearchResult(
            best=best,
            metrics=dict(metrics),
            feasible=self.scorer.feasible(metrics),
            unmet=self.scorer.violations(metrics),
            front=pareto_front(seen, self.costs),
            history=list(self.history),
            evaluations=self.evaluations,
            seconds=time.monotonic() - self._start,
            strategy=strategy,
            ranked=[(a, dict(m)) for a, m in ranked],
        )


def search(
    problem: Problem,
    demands: Demands,
    strategy: str = "greedy",
    *,
    seed: int = 0,
    budget: Budget | None = None,
    progress: Progress | None = None,
    workers: int = 1,
    settings: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Searches `problem` for the assignment that best meets `demands`.

    Args:
        problem: units, baseline metrics and batched evaluation.
        demands: budgets and objective weights.
        strategy: `greedy`, `evolutionary` or `rl`.
        seed: the strategies are deterministic given the seed and the evaluations.
        budget: evaluations and seconds at most.
        progress: called `(message, done, total)` after each chunk of evaluations.
        workers: candidates handed to the problem at once (from as many threads if the
            problem is `thread_safe`).
        settings: the strategy's own keyword arguments (e.g. `population` for
            evolutionary, `episodes` for rl).

    Raises:
        SearchError: unknown strategy, or a problem without units.
    """
    if strategy not in STRATEGIES:
        raise SearchError(
            f"unknown search strategy {strategy!r}; use one of {', '.join(STRATEGIES)}"
        )
    if not problem.units:
        raise SearchError("the problem has no units to decide on")
    for unit in problem.units:
        if not unit.options or unit.options[0].strength != 0.0:
            raise SearchError(f"unit {unit.name!r}: option 0 must be keep (strength 0)")
    import importlib
    import inspect

    module = importlib.import_module(f"tailor.search.{strategy}")
    settings = dict(settings or {})
    try:
        inspect.signature(module.run).bind(None, seed=seed, **settings)
    except TypeError:
        known = [p for p in inspect.signature(module.run).parameters if p not in ("ctx", "seed")]
        raise SearchError(
            f"strategy {strategy} takes the settings {', '.join(known) or 'none'}, "
            f"not {', '.join(sorted(settings))}"
        ) from None
    ctx = SearchContext(
        problem, demands, budget=budget, progress=progress, workers=workers, label=strategy
    )
    module.run(ctx, seed=seed, **settings)
    result = ctx.result(strategy)
    logger.info(
        "%s: %d evaluations in %.1f s, best %s (%s)",
        strategy,
        result.evaluations,
        result.seconds,
        result.best,
        "feasible" if result.feasible else "unmet: " + "; ".join(result.unmet),
    )
    return result
