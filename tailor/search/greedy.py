"""Greedy search by per-unit sensitivity (NetAdapt, Yang et al. ECCV 2018; AIMET's
per-layer compression-ratio selection).

1. Sensitivity: each option of each unit is evaluated alone (every other unit keeps).
   Its change from the baseline predicts what it does in any plan. Each unit's mildest
   option of every technique family (the storage passes count as one) goes first
   (larger units first), then the uniform
   plans (below; the most promising first), then the other options. Under a budget
   (evaluations or seconds, at the rate measured) each phase ends at its share of it
   (`_PHASES`: 40 %, 60 %, 65 %, the repair 75 %), so a budgeted search still ends with
   steps and a per-layer plan; options left unmeasured are measured when the steps run
   dry and budget remains.
2. Steps: from the current plan, a step moves one unit to another option (stronger,
   or sideways to another technique: from the uniform start the best move is often to
   another family). Each step's effect on the plan is predicted additively from the
   sensitivities. While a latency, energy, storage or peak-memory budget is unmet, steps
   are ranked by how much of the unmet budgets they recover per point of accuracy lost;
   once all are met, by how much they improve the objective per point of accuracy lost.
   Steps predicted to break the accuracy budget wait.
3. The best-ranked steps are evaluated for real on the whole plan (`workers` at a time);
   the first that keeps the accuracy budget and improves the plan's score is taken, the
   others that fail are rejected for good, until no step is left.
4. Polish: ratio-greedy can paint itself into a corner (a cheap early step that a
   better plan would not take). Moves of one or two units to any other option are
   predicted the same way; the one with the best predicted score is evaluated (or, if
   already seen, its real score used) and taken if it really improves the plan, until
   no move is predicted to. Pairs are tried only while the space is small
   (`pair_limit`).

The uniform plans (one option on every unit that offers it) are evaluated after the
mildest options, and the best one within the accuracy budget, if it scores better than
keeping everything, is where the steps start. A uniform plan that breaks only the
accuracy budget is repaired first when the sensitivities predict that, backed off to
the budget, it beats the start (:func:`_repair`: its most sensitive units backed off to
milder options, AMC/NetAdapt run backwards; the most promising plans first), and becomes
the start if the repaired plan really meets the budget and scores better. Every phase
stops when the budget runs out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from tailor.search.base import COST_METRICS, Assignment, Evaluation, Problem, SearchContext

if TYPE_CHECKING:
    from tailor.demands import Demands

__all__ = ["BackOff", "run"]

logger = logging.getLogger(__name__)

_TINY = 1e-6  # accuracy "lost" by a free step, so its ratio stays finite and ranks by gain


def _predict(
    current: Mapping[str, float],
    base: Mapping[str, float],
    alone_new: Mapping[str, float],
    alone_old: Mapping[str, float] | None,
) -> dict[str, float]:
    """`current` with the unit's old option's change from the baseline swapped for the
    new option's (additive model of sensitivities)."""
    out = {}
    for key, value in current.items():
        if key not in base or key not in alone_new:
            out[key] = value
            continue
        delta = alone_new[key] - base[key]
        if alone_old is not None and key in alone_old:
            delta -= alone_old[key] - base[key]
        out[key] = value + delta
    return out


def run(ctx: SearchContext, seed: int = 0, *, polish: bool = True, pair_limit: int = 200) -> None:
    """Runs the greedy search on `ctx` (deterministic; `seed` is unused).

    Args:
        ctx: the search context.
        seed: unused (the search is deterministic).
        polish: run the polish phase.
        pair_limit: two-unit moves are polished only while the units have at most this
            many non-keep options in all.
    """
    del seed
    units, scorer = ctx.units, ctx.scorer
    floor = ctx.demands.accuracy_floor(scorer.base_accuracy)
    if floor is not None and math.isnan(floor):
        floor = None

    def single(i: int, j: int) -> tuple[int, ...]:
        return tuple(j if k == i else 0 for k in range(len(units)))

    def accuracy_ok(metrics: Mapping[str, float]) -> bool:
        acc = metrics.get("accuracy")
        return floor is None or acc is None or acc >= floor - 1e-12

    chunk = 2 * ctx.workers

    def measure_alone(pairs: list[tuple[int, int]], until: float) -> list[tuple[int, int]]:
        """Measures options alone, in chunks, until `until` of the budget is used (an
        anytime search: under a budget the result is still a per-layer plan); returns
        the pairs left unmeasured."""
        while pairs and not ctx.exhausted:
            now = _chunk(ctx, pairs, until, chunk)
            if not now:
                logger.info(
                    "greedy: the budget leaves no room to measure %d further options alone",
                    len(pairs),
                )
                break
            ctx.evaluate([single(i, j) for i, j in now])
            pairs = pairs[len(now) :]
        return pairs

    # Each unit's mildest option per family first, then the uniform plans (one option
    # everywhere it exists: the per-layer search starts from the best single technique,
    # so it ends at least as good as every uniform plan it evaluated), then the other
    # options, a repair of the uniform plans that lose too much, and the steps. Under a
    # budget each phase ends at its share of it (_PHASES), so the steps get the rest.
    core, rest = _sensitivity_order(units)
    uniform = _uniform_plans(units)
    ctx.phase = "sensitivity"
    left = measure_alone(core, until=_PHASES["core"])
    ctx.phase = "uniform"
    current = ctx.keep
    for cand in _by_promise(ctx, uniform, single):
        if _spent(ctx, _PHASES["uniform"]):
            logger.info("greedy: the budget leaves no room for more uniform plans")
            break
        ev = ctx.evaluate([cand])[0]
        if ev is not None and ev.metrics is not None and accuracy_ok(ev.metrics):
            if ctx.score(cand) < ctx.score(current):
                current = cand
    ctx.phase = "sensitivity"
    pairs = left + rest
    if not left:  # the other options only once every unit's mildest ones are known
        pairs = measure_alone(pairs, until=_PHASES["rest"])

    # A uniform plan that breaks only the accuracy budget is often strong everywhere but
    # too much for a few sensitive units: repaired, it may beat every feasible start.
    ctx.phase = "repair"
    for start in _repairable(ctx, uniform, current, single, floor)[:_REPAIRS]:
        if _spent(ctx, _PHASES["repair"]):
            break
        fixed = _repair(ctx, start, single, floor)
        if fixed is not None and ctx.score(fixed) < ctx.score(current):
            logger.debug("greedy: repaired %s into %s", start, fixed)
            current = fixed

    rejected: set[tuple[int, int]] = set()

    def reject_bad_alone() -> None:
        for i, u in enumerate(units):
            for j in range(1, len(u.options)):
                m = ctx.metrics(single(i, j))
                # An option that fails, or breaks the accuracy budget on its own, will
                # not do better in company.
                if ctx.lookup(single(i, j)) is not None and (m is None or not accuracy_ok(m)):
                    rejected.add((i, j))

    reject_bad_alone()

    while True:
        current = _steps(ctx, current, rejected, single, accuracy_ok)
        if polish:
            ctx.phase = "polish"
            current = _polish(ctx, current, single, pair_limit)
        if ctx.exhausted or not pairs:
            return
        # Budget left after the steps ran dry: measure more options alone, step again.
        ctx.phase = "sensitivity"
        more = _chunk(ctx, pairs, 1.0, chunk)
        if not more:
            return
        ctx.evaluate([single(i, j) for i, j in more])
        pairs = pairs[len(more) :]
        reject_bad_alone()


def _steps(
    ctx: SearchContext,
    current: tuple[int, ...],
    rejected: set[tuple[int, int]],
    single: Callable[[int, int], tuple[int, ...]],
    accuracy_ok: Callable[[Mapping[str, float]], bool],
) -> tuple[int, ...]:
    """Phase 2-3 (see the module): steps from `current` until none is left; the plan."""
    units, scorer, base = ctx.units, ctx.scorer, ctx.problem.baseline
    ctx.phase = "steps"
    while not ctx.exhausted:
        cur_metrics = ctx.metrics(current)
        assert cur_metrics is not None  # only evaluated, successful plans become current
        cur_short = scorer.shortfalls(cur_metrics)
        budget_mode = any(cur_short.get(k, 0.0) > 0 for k in COST_METRICS)
        cur_objective = scorer.objective(cur_metrics, clip=False)
        ranked: list[tuple[float, int, int]] = []
        for i, u in enumerate(units):
            alone_old = ctx.metrics(single(i, current[i])) if current[i] else None
            for j in range(1, len(u.options)):
                # Any other option, not only a stronger one: from 4-bit weights (what a
                # uniform start may pick) a move to tucker2 is sideways, and often the
                # best step. A step is taken only if it really improves, so no cycles.
                if (i, j) in rejected or j == current[i]:
                    continue
                alone_new = ctx.metrics(single(i, j))
                if alone_new is None:  # not measured (budget) or failed
                    continue
                pred = _predict(cur_metrics, base, alone_new, alone_old)
                if not accuracy_ok(pred):
                    continue
                lost = max(cur_metrics.get("accuracy", 0.0) - pred.get("accuracy", 0.0), 0.0)
                if budget_mode:
                    short = scorer.shortfalls(pred)
                    gain = sum(cur_short.get(k, 0.0) - short.get(k, 0.0) for k in COST_METRICS)
                else:
                    gain = cur_objective - scorer.objective(pred, clip=False)
                if gain > 1e-12:
                    ranked.append((-gain / (lost + _TINY), i, j))
        if not ranked:
            break
        ranked.sort()
        picks = [(i, j) for _, i, j in ranked[: ctx.workers]]
        candidates = [tuple(j if k == i else c for k, c in enumerate(current)) for i, j in picks]
        results = ctx.evaluate(candidates)
        cur_score = ctx.score(current)  # the normaliser may have widened
        taken = None
        for (i, j), cand, ev in zip(picks, candidates, results, strict=True):
            if ev is None:  # the budget ran out before this one
                continue
            if ev.metrics is not None and accuracy_ok(ev.metrics):
                if taken is None and scorer.score(ev.metrics) < cur_score:
                    taken = cand
                    continue
                if scorer.score(ev.metrics) < cur_score:
                    continue  # good too, but one step at a time; it is ranked again
            rejected.add((i, j))
        if taken is not None:
            logger.debug("greedy: took %s (score %.4f)", taken, ctx.score(taken))
            current = taken
    return current


#: Under a budget, the share of it (evaluations or seconds) by which each phase ends at
#: the latest: the steps, which make the plan per-layer, always get the last quarter.
_PHASES = {"core": 0.4, "uniform": 0.6, "rest": 0.65, "repair": 0.75}
#: Uniform plans that break only the accuracy budget, repaired (best predicted repair first).
_REPAIRS = 2
#: Evaluations spent on repairing one plan at most.
_REPAIR_TRIES = 3


def _repairable(
    ctx: SearchContext,
    uniform: list[tuple[int, ...]],
    current: tuple[int, ...],
    single: Callable[[int, int], tuple[int, ...]],
    floor: float | None,
) -> list[tuple[int, ...]]:
    """The evaluated uniform plans that break the accuracy budget and no other and whose
    back-off (:func:`_back_off`, predicted) would beat `current`, in the order of that
    predicted objective: a plan far beyond the budget (tucker2 at rank 0.25) may score
    best as it is, yet keep little once enough units are backed off, while one a point
    over it (tucker2 at 0.5 with 4-bit weights) needs two."""
    scorer = ctx.scorer
    cur = ctx.metrics(current)
    bar = scorer.objective(cur, clip=False) if cur is not None else float("inf")
    found = []
    for cand in uniform:
        m = ctx.metrics(cand)
        if m is None or scorer.feasible(m):
            continue
        short = scorer.shortfalls(m)
        if short.get("accuracy", 0.0) <= 0 or any(
            v > 0 for k, v in short.items() if k != "accuracy"
        ):
            continue
        if scorer.objective(m, clip=False) >= bar:
            continue
        backed = _back_off(ctx, cand, m, single, floor)
        if backed is None:
            continue
        value = scorer.objective(backed[1], clip=False)
        if value < bar - 1e-9:  # the plan in hand again, added up in another order: no
            found.append((value, cand))
    return [cand for _, cand in sorted(found)]


#: What an option must not have less of than the one it replaces, to be milder:
#: exact counts, not timings (a timing's noise must not pass a factorization as milder).
MILDER_KEYS = ("macs",)


def _milder(new: Mapping[str, float], old: Mapping[str, float]) -> bool:
    """Whether an option (its metrics alone) computes no less than another: no fewer
    MACs. Reading more accurate alone is not enough: alone, an option's change is often
    within the noise, and in a plan it can be far from it (UCI HAPT: a 16-entry codebook
    "backed off" to tucker2 then 4-bit weights read +0.97 points alone, -8 in the plan,
    after pruning its inputs). It may store less: weights kept at 4 bits, clustered or
    in int8 change how they are stored, not which products are computed (ResNet on
    Fashion-MNIST: with stored bytes counted too, a tucker2 layer could only be backed
    off to keep; those plans stored 0.17-0.24x and lost to uniform tucker2 in 3 of 3
    runs)."""
    return all(new[k] >= old[k] - 1e-9 for k in MILDER_KEYS if k in new and k in old)


def _back_off(
    ctx: SearchContext,
    plan: tuple[int, ...],
    real: Mapping[str, float],
    single: Callable[[int, int], tuple[int, ...]],
    floor: float | None,
) -> tuple[tuple[int, ...], dict[str, float]] | None:
    """`plan` (with its real metrics) backed off until the sensitivities predict it
    within the accuracy budget: units moved to milder options (keep, or another option
    measured alone that computes no less: :func:`_milder`) in the order of the
    objective they give up per point of accuracy they win back. A whole plan usually
    loses more than the sum of its units' losses alone (they interact): the recovery of
    a move is scaled by the plan's real loss over that sum.

    Returns:
        (assignment, predicted metrics), or None (no budget, or no move left).
    """
    if floor is None:
        return None
    units, scorer, base = ctx.units, ctx.scorer, ctx.problem.baseline
    base_acc = base["accuracy"]
    alone = {i: ctx.metrics(single(i, j)) if j else dict(base) for i, j in enumerate(plan)}
    summed = sum(base_acc - m["accuracy"] for m in alone.values() if m is not None)
    real_loss = base_acc - real["accuracy"]
    scale = min(max(real_loss / summed, 0.5), 4.0) if summed > 1e-9 else 1.0
    a, pred = list(plan), dict(real)
    while pred["accuracy"] < floor - 1e-12:
        best = None
        now = scorer.objective(pred, clip=False)
        for i, u in enumerate(units):
            old = alone[i]
            if not a[i] or old is None:
                continue
            for j in range(len(u.options)):
                new = dict(base) if j == 0 else ctx.metrics(single(i, j))
                if j == a[i] or new is None or not _milder(new, old):
                    continue
                won = scale * (new["accuracy"] - old["accuracy"])
                if won <= 1e-12:
                    continue
                moved = _predict(pred, base, new, old)
                moved["accuracy"] = pred["accuracy"] + won
                ratio = (scorer.objective(moved, clip=False) - now) / won
                if best is None or ratio < best[0]:
                    best = (ratio, i, j, moved, new)
        if best is None:
            return None
        _, i, j, pred, alone[i] = best
        a[i] = j
    return tuple(a), pred


class BackOff:
    """Backs plans of an earlier search off by an accuracy seen elsewhere (for example on
    held-out data), with that search's sensitivities (:func:`_back_off`), and scores
    plans on its scale.

    Args:
        problem, demands: the earlier search's.
        history: its evaluations (the options measured alone among them).
    """

    def __init__(
        self,
        problem: Problem,
        demands: Demands,
        history: Sequence[tuple[Assignment, Evaluation]],
    ):
        self._ctx = SearchContext(problem, demands)
        self._ctx.replay(history)
        floor = demands.accuracy_floor(self._ctx.scorer.base_accuracy)
        self._floor = None if floor is None or math.isnan(floor) else floor
        n = len(self._ctx.units)
        self._single = lambda i, j: tuple(j if k == i else 0 for k in range(n))

    def objective(self, metrics: Mapping[str, float]) -> float:
        """The weighted, normalised objective over everything the search saw (lower is
        better; predictions beyond its range extend the line)."""
        return self._ctx.scorer.objective(metrics, clip=False)

    def __call__(
        self,
        plan: Sequence[int],
        accuracy: float,
        metrics: Mapping[str, float] | None = None,
    ) -> tuple[tuple[int, ...], dict[str, float]] | None:
        """`plan`, which really scores `accuracy` on the search's scale, backed off until
        the sensitivities predict it within the accuracy budget.

        Args:
            metrics: the plan's metrics when the search never evaluated it (a plan
                backed off before: the prediction this returned for it).

        Returns:
            (the milder assignment, its predicted metrics), or None (no accuracy
            budget, `plan` unknown, already within the budget, or no move left).
        """
        real = self._ctx.metrics(plan) if metrics is None else dict(metrics)
        if real is None or self._floor is None:
            return None
        out = _back_off(
            self._ctx, tuple(plan), dict(real, accuracy=accuracy), self._single, self._floor
        )
        return None if out is None or out[0] == tuple(plan) else out


def _repair(
    ctx: SearchContext,
    start: tuple[int, ...],
    single: Callable[[int, int], tuple[int, ...]],
    floor: float | None,
    tries: int = _REPAIR_TRIES,
) -> tuple[int, ...] | None:
    """Backs a plan that breaks the accuracy budget off to one that meets it
    (:func:`_back_off`); the backed-off plan is evaluated, and the repair goes on from
    its real metrics while it still misses.

    Returns:
        A plan within every budget, or None (no move left, the tries or budget spent).
    """
    current = start
    for attempt in range(tries + 1):
        real = ctx.metrics(current)
        if real is None:
            return None
        if ctx.scorer.feasible(real):
            return current
        if attempt == tries:
            return None
        backed = _back_off(ctx, current, real, single, floor)
        if backed is None:
            return None
        current = backed[0]
        if ctx.lookup(current) is None:
            ctx.evaluate([current])
    return None


def _uniform_plans(units: list) -> list[tuple[int, ...]]:
    """One assignment per option label offered by at least two units: that option on
    every unit offering it."""
    labels: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        for j in range(1, len(u.options)):
            labels.setdefault(u.options[j].label, []).append(i)
    out = []
    for label, members in labels.items():
        if len(members) < 2:
            continue
        choice = [0] * len(units)
        for i in members:
            choice[i] = next(j for j, o in enumerate(units[i].options) if o.label == label)
        out.append(tuple(choice))
    return out


#: Families that do the same thing to a layer (shrink its file, not its time): the core
#: measures the mildest of them, the others come with the rest.
_KINDS = {"quantize_weights": "storage", "cluster_weights": "storage"}


def _sensitivity_order(units: list) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(core, rest): the (unit, option) pairs measured first — each unit's mildest
    option of every technique family (storage passes count as one), what the steps take
    first, larger units first — and the others."""
    core, rest = [], []
    for i in sorted(range(len(units)), key=lambda i: -units[i].share):
        u = units[i]
        seen: set[str] = set()
        by_strength = sorted(range(1, len(u.options)), key=lambda j: (u.options[j].strength, j))
        for j in by_strength:
            family = _KINDS.get(u.options[j].family, u.options[j].family)
            (rest if family in seen else core).append((i, j))
            seen.add(family)
    return core, rest


def _room(ctx: SearchContext, until: float) -> int | None:
    """How many more evaluations fit before `until` (a share) of the budget is used, at
    the rate measured so far; None when the search has no budget."""
    budget = ctx.budget
    room: int | None = None
    if budget.max_evaluations is not None:
        room = math.floor(until * budget.max_evaluations + 1e-9) - ctx.evaluations
    if budget.max_seconds is not None:
        left = until * budget.max_seconds - ctx.elapsed
        if ctx.evaluations:
            by_time = math.floor(left / (ctx.elapsed / ctx.evaluations))
        else:
            by_time = 1 if left > 0 else 0  # no rate yet: one, to measure it
        room = by_time if room is None else min(room, by_time)
    return None if room is None else max(room, 0)


def _spent(ctx: SearchContext, until: float) -> bool:
    """Whether `until` (a share) of the budget is used up, at the rate measured so far."""
    room = _room(ctx, until)
    return room is not None and room <= 0


def _chunk(
    ctx: SearchContext, pairs: list[tuple[int, int]], until: float, size: int
) -> list[tuple[int, int]]:
    """The leading `pairs`, at most `size`, that fit before `until` of the budget."""
    room = _room(ctx, until)
    return pairs[: size if room is None else min(size, room)]


def _by_promise(
    ctx: SearchContext,
    plans: list[tuple[int, ...]],
    single: Callable[[int, int], tuple[int, ...]],
) -> list[tuple[int, ...]]:
    """`plans` ordered by the score the sensitivities predict for them (additively,
    from the options measured alone; units not measured count as unchanged), so a
    budget that cannot afford them all evaluates the promising ones."""
    base = ctx.problem.baseline

    def predicted(plan: tuple[int, ...]) -> float:
        metrics = dict(base)
        for i, j in enumerate(plan):
            alone = ctx.metrics(single(i, j)) if j else None
            if alone is not None:
                metrics = _predict(metrics, base, alone, None)
        return ctx.scorer.score(metrics, clip=False)

    return sorted(plans, key=predicted)


def _polish(
    ctx: SearchContext,
    current: tuple[int, ...],
    single: Callable[[int, int], tuple[int, ...]],
    pair_limit: int,
) -> tuple[int, ...]:
    units, scorer, base = ctx.units, ctx.scorer, ctx.problem.baseline
    n = len(units)
    pairs = sum(len(u.options) - 1 for u in units) <= pair_limit
    while not ctx.exhausted:
        cur_metrics = ctx.metrics(current)
        assert cur_metrics is not None
        cur_score = scorer.score(cur_metrics, clip=False)

        def moved(
            metrics: dict[str, float], a: tuple[int, ...], i: int, j: int
        ) -> tuple[dict[str, float], tuple[int, ...]] | None:
            """(metrics, assignment) with unit i moved to option j, or None."""
            alone_new = ctx.metrics(single(i, j)) if j else dict(base)
            if alone_new is None:
                return None
            alone_old = ctx.metrics(single(i, a[i])) if a[i] else None
            if a[i] and alone_old is None:
                return None
            return _predict(metrics, base, alone_new, alone_old), a[:i] + (j,) + a[i + 1 :]

        best: tuple[float, tuple[int, ...]] | None = None
        for i in range(n):
            for j in range(len(units[i].options)):
                if j == current[i] or (one := moved(cur_metrics, current, i, j)) is None:
                    continue
                found = [one]
                if pairs:
                    for k in range(i + 1, n):
                        for m in range(len(units[k].options)):
                            if m != current[k] and (two := moved(*one, k, m)) is not None:
                                found.append(two)
                for pred, a in found:
                    seen = ctx.lookup(a)
                    if seen is not None and seen.metrics is None:
                        continue
                    value = scorer.score(seen.metrics if seen else pred, clip=False)
                    if value < cur_score - 1e-12 and (best is None or value < best[0]):
                        best = (value, a)
        if best is None:
            return current
        target = best[1]
        if ctx.lookup(target) is None:
            ctx.evaluate([target])
            if ctx.lookup(target) is None:  # the budget ran out
                return current
        if ctx.score(target) < ctx.score(current):
            logger.debug("greedy polish: took %s (score %.4f)", target, ctx.score(target))
            current = target
    return current
