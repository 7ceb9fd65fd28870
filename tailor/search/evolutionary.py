"""NSGA-II (Deb et al., IEEE TEVC 2002) over assignments, with Deb's constraint handling.

Objectives are `-accuracy` and the costs the demands care about (a non-zero weight or a
budget; :func:`~tailor.search.base.active_costs`); accuracy is dropped when it has no
weight and no budget. Budgets enter by constraint domination: a plan that meets them
dominates one that does not, and of two that miss, the one that misses by less wins.
The first population is all-keep, plans of one strength everywhere, and the
single-unit options a greedy search would measure first; offspring come by binary tournament (rank, then crowding distance),
uniform crossover and per-unit mutation, from a seeded numpy Generator. The best plan is
picked from everything evaluated by the :class:`~tailor.search.base.Scorer`; the
result's front is the Pareto front of all of it.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from tailor.search.base import SearchContext

__all__ = ["run", "non_dominated_sort", "crowding_distance"]

logger = logging.getLogger(__name__)

Assignment = tuple[int, ...]


def _dominates(a: np.ndarray, va: float, b: np.ndarray, vb: float) -> bool:
    """Deb's constrained domination: feasibility first, then smaller violation, then Pareto."""
    if va != vb and (va > 0 or vb > 0):
        return va < vb
    if va > 0:  # equally infeasible
        return False
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated_sort(objectives: np.ndarray, violations: np.ndarray) -> list[list[int]]:
    """Fronts of indices, best first, under constrained domination (lower is better)."""
    n = len(objectives)
    dominated_by = [[] for _ in range(n)]
    counts = np.zeros(n, dtype=int)
    for p in range(n):
        for q in range(p + 1, n):
            if _dominates(objectives[p], violations[p], objectives[q], violations[q]):
                dominated_by[p].append(q)
                counts[q] += 1
            elif _dominates(objectives[q], violations[q], objectives[p], violations[p]):
                dominated_by[q].append(p)
                counts[p] += 1
    fronts = [[i for i in range(n) if counts[i] == 0]]
    while fronts[-1]:
        nxt = []
        for p in fronts[-1]:
            for q in dominated_by[p]:
                counts[q] -= 1
                if counts[q] == 0:
                    nxt.append(q)
        fronts.append(sorted(nxt))
    return fronts[:-1]


def crowding_distance(objectives: np.ndarray) -> np.ndarray:
    """Crowding distance of each row within one front (boundary points: infinity)."""
    n, m = objectives.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, math.inf)
    for k in range(m):
        order = np.argsort(objectives[:, k], kind="stable")
        column = objectives[order, k]
        distance[order[0]] = distance[order[-1]] = math.inf
        span = column[-1] - column[0]
        if not np.isfinite(span) or span <= 0:
            continue
        distance[order[1:-1]] += (column[2:] - column[:-2]) / span
    return distance


def _initial(ctx: SearchContext, size: int, rng: np.random.Generator) -> list[Assignment]:
    """All-keep, plans of one strength everywhere (each unit's option nearest to 1/4,
    1/2, 3/4 and 1), single-unit options (sampled if too many), then random plans."""
    n = len(ctx.units)
    levels = []
    for level in (0.25, 0.5, 0.75, 1.0):
        levels.append(
            tuple(
                min(
                    range(1, len(u.options)),
                    key=lambda j, u=u: (abs(u.options[j].strength - level), j),
                )
                if len(u.options) > 1
                else 0
                for u in ctx.units
            )
        )
    singles = [
        tuple(j if k == i else 0 for k in range(n))
        for i, u in enumerate(ctx.units)
        for j in range(1, len(u.options))
    ]
    population = list(dict.fromkeys([ctx.keep, *levels]))[:size]
    room = size - len(population)
    if len(singles) > room:
        picked = rng.choice(len(singles), size=room, replace=False)
        singles = [singles[i] for i in sorted(picked)]
    population = list(dict.fromkeys([*population, *singles]))
    seen = set(population)
    for _ in range(50 * size):
        if len(population) >= size:
            break
        a = tuple(int(rng.integers(len(u.options))) for u in ctx.units)
        if a not in seen:
            seen.add(a)
            population.append(a)
    return population


def run(
    ctx: SearchContext,
    seed: int = 0,
    *,
    population: int | None = None,
    generations: int | None = None,
    crossover: float = 0.9,
    mutation: float | None = None,
) -> None:
    """Runs NSGA-II on `ctx`.

    Args:
        ctx: the search context.
        seed: seeds the numpy Generator.
        population: individuals per generation (default: twice the units, 12 to 48).
        generations: at most this many (default: until the budget runs out, or 20
            without an evaluation budget).
        crossover: probability that a child mixes two parents (uniform crossover).
        mutation: per-unit probability of a random new option (default 1 / units).
    """
    rng = np.random.default_rng(seed)
    n = len(ctx.units)
    size = population or int(min(max(2 * n, 12), 48))
    size += size % 2
    if generations is None:
        generations = 20 if ctx.budget.max_evaluations is None else 10**9
    p_mut = mutation if mutation is not None else 1.0 / n
    objectives_keys = list(ctx.costs)
    weights = ctx.demands.weights
    if weights.get("accuracy", 0.0) > 0 or ctx.demands.max_accuracy_drop is not None:
        objectives_keys.insert(0, "accuracy")

    def vector(a: Assignment) -> tuple[np.ndarray, float]:
        m = ctx.metrics(a)
        if m is None:  # failed: behind everything
            return np.full(len(objectives_keys), math.inf), math.inf
        values = [
            -m.get(k, -math.inf) if k == "accuracy" else m.get(k, math.inf) for k in objectives_keys
        ]
        return np.array(values, dtype=float), ctx.scorer.violation(m)

    def survivors(pool: list[Assignment], keep: int) -> tuple[list[Assignment], dict]:
        vecs = [vector(a) for a in pool]
        objs = np.array([v[0] for v in vecs])
        viol = np.array([v[1] for v in vecs])
        chosen: list[int] = []
        info: dict[Assignment, tuple[int, float]] = {}
        for rank, front in enumerate(non_dominated_sort(objs, viol)):
            finite = np.where(np.isfinite(objs[front]), objs[front], 0.0)
            crowd = crowding_distance(finite)
            for idx, c in zip(front, crowd, strict=True):
                info[pool[idx]] = (rank, float(c))
            if len(chosen) + len(front) <= keep:
                chosen.extend(front)
            else:
                order = sorted(range(len(front)), key=lambda t: (-crowd[t], front[t]))
                chosen.extend(front[t] for t in order[: keep - len(chosen)])
                break
        return [pool[i] for i in chosen], info

    def tournament(parents: list[Assignment], info: dict) -> Assignment:
        a, b = rng.choice(len(parents), size=2, replace=False)
        ra, ca = info[parents[a]]
        rb, cb = info[parents[b]]
        return parents[a] if (ra, -ca) <= (rb, -cb) else parents[b]

    def child(parents: list[Assignment], info: dict) -> Assignment:
        x, y = tournament(parents, info), tournament(parents, info)
        if rng.random() < crossover:
            mask = rng.random(n) < 0.5
            genes = [x[k] if mask[k] else y[k] for k in range(n)]
        else:
            genes = list(x)
        for k, u in enumerate(ctx.units):
            if len(u.options) > 1 and rng.random() < p_mut:
                other = int(rng.integers(len(u.options) - 1))
                genes[k] = other + (other >= genes[k])
        return tuple(genes)

    ctx.phase = "initial population"
    pool = _initial(ctx, size, rng)
    ctx.evaluate(pool)
    pool = [a for a in pool if ctx.lookup(a) is not None]  # the budget may cut the batch
    if len(pool) < 2:
        return
    parents, info = survivors(pool, size)
    stale = 0
    for gen in range(generations):
        if ctx.exhausted:
            break
        ctx.phase = f"generation {gen + 1}"
        offspring: list[Assignment] = []
        fresh = set()
        for _ in range(size):
            # Retry a few times for a child not seen yet: a repeat costs no evaluation
            # but teaches nothing.
            for _attempt in range(10):
                c = child(parents, info)
                if ctx.lookup(c) is None and c not in fresh:
                    break
            fresh.add(c)
            offspring.append(c)
        before = ctx.evaluations
        ctx.evaluate(offspring)
        stale = stale + 1 if ctx.evaluations == before else 0
        if stale >= 3:  # the space near the front is exhausted
            logger.debug("evolutionary: no new candidates for 3 generations; stopping")
            break
        evaluated = [a for a in dict.fromkeys(parents + offspring) if ctx.lookup(a) is not None]
        parents, info = survivors(evaluated, size)
        if len(parents) < 2:
            break
