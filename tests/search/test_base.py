"""The search's common ground: options' families, the Scorer's ranking, the Pareto front,
the context's memo, budget and progress, and the dispatch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tailor.demands import Demands
from tailor.errors import TailorError
from tailor.search.base import (
    Budget,
    Evaluation,
    Option,
    Problem,
    Scorer,
    SearchContext,
    SearchError,
    Unit,
    pareto_front,
    search,
)
from tests.search import Synthetic

BASE = {"accuracy": 0.9, "latency": 10.0, "storage": 1000.0, "energy": 20.0}


@pytest.mark.parametrize(
    "label,family",
    [("keep", "keep"), ("prune(ratio=0.3)", "prune"), ("tucker2(rank=0.5)+int8", "tucker2"),
     ("quantize(int8)", "quantize"), ("int8", "int8"), (" svd (rank=0.25)", "svd")],
)  # fmt: skip
def test_family_is_the_label_up_to_the_first_paren_or_plus(label, family):
    assert Option(label).family == family


def test_synthetic_problem_follows_the_protocol():
    assert isinstance(Synthetic(3), Problem)


def test_feasible_plans_rank_before_infeasible_and_closer_misses_first():
    d = Demands(max_accuracy_drop=0.01, max_latency_ms=8.0)
    scorer = Scorer(d, BASE)
    good = {"accuracy": 0.895, "latency": 7.9, "storage": 900.0, "energy": 18.0}
    great_but_slow = {"accuracy": 0.9, "latency": 8.1, "storage": 100.0, "energy": 1.0}
    far_miss = {"accuracy": 0.9, "latency": 12.0, "storage": 100.0, "energy": 1.0}
    for m in (good, great_but_slow, far_miss):
        scorer.observe(m)
    assert scorer.feasible(good) and not scorer.feasible(great_but_slow)
    assert scorer.score(good) < scorer.score(great_but_slow) < scorer.score(far_miss)
    assert scorer.violation(great_but_slow) == pytest.approx(0.1 / 8.0)
    assert scorer.shortfalls(far_miss) == {"accuracy": 0.0, "latency": pytest.approx(0.5)}
    assert scorer.violations(far_miss) == ["latency 12 ms > 8 ms"]
    assert scorer.score(None) == math.inf


def test_objective_normalises_over_everything_seen():
    d = Demands(max_accuracy_drop=None, weights={"latency": 1.0})
    scorer = Scorer(d, BASE)
    point = {"accuracy": 0.9, "latency": 5.0}
    scorer.observe(point)
    assert scorer.objective(point) == 0.0  # the best seen
    scorer.observe({"accuracy": 0.9, "latency": 0.0})
    assert scorer.objective(point) == pytest.approx(0.5)  # the range widened
    # Unclipped, a prediction beyond the range keeps improving.
    assert scorer.objective({"latency": -5.0}, clip=False) == pytest.approx(-0.5)
    assert scorer.objective({"latency": -5.0}) == 0.0


def test_a_given_normaliser_stays_fixed():
    from tailor.demands import Normalizer

    d = Demands(max_accuracy_drop=None, weights={"latency": 1.0})
    scorer = Scorer(d, BASE, normalizer=Normalizer({"latency": 0.0}, {"latency": 10.0}))
    scorer.observe({"latency": -100.0})
    assert scorer.objective({"latency": 5.0}) == pytest.approx(0.5)


def test_pareto_front_drops_dominated_points():
    pts = [
        ((0,), {"accuracy": 0.9, "latency": 10.0}),
        ((1,), {"accuracy": 0.8, "latency": 5.0}),
        ((2,), {"accuracy": 0.8, "latency": 6.0}),  # dominated by (1,)
        ((3,), {"accuracy": 0.7, "latency": 7.0}),  # dominated by (1,)
        ((4,), {"accuracy": 0.6, "latency": 1.0}),
    ]
    assert [a for a, _ in pareto_front(pts, ["latency"])] == [(0,), (1,), (4,)]


class Counting:
    """A problem that records each batch it is asked to evaluate."""

    def __init__(self, n=3, k=3, thread_safe=False):
        self.units = [Unit(f"u{i}", [Option("keep")] + [Option(f"x({j})", None, j / k) for j in range(1, k)]) for i in range(n)]  # fmt: skip
        self.baseline = {"accuracy": 1.0, "latency": 10.0}
        self.batches = []
        self.thread_safe = thread_safe

    def evaluate(self, assignments):
        self.batches.append(list(assignments))
        return [Evaluation({"accuracy": 1.0 - 0.01 * sum(a), "latency": 10.0 - sum(a)}) for a in assignments]  # fmt: skip


def test_context_evaluates_each_assignment_once_and_never_all_keep():
    problem = Counting()
    ctx = SearchContext(problem, Demands())
    out = ctx.evaluate([(0, 0, 0), (1, 0, 0), (1, 0, 0), (0, 2, 0)])
    assert [e.metrics["latency"] for e in out] == [10.0, 9.0, 9.0, 8.0]
    ctx.evaluate([(1, 0, 0)])
    assert [a for b in problem.batches for a in b] == [(1, 0, 0), (0, 2, 0)]
    assert ctx.evaluations == 2 and [a for a, _ in ctx.history] == [(1, 0, 0), (0, 2, 0)]


def test_context_stops_at_the_budget_and_reports_progress():
    problem = Counting()
    calls = []
    ctx = SearchContext(
        problem,
        Demands(),
        budget=Budget(max_evaluations=2),
        progress=lambda msg, done, total: calls.append((msg, done, total)),
        label="greedy",
    )
    ctx.phase = "sensitivity"
    out = ctx.evaluate([(1, 0, 0), (0, 1, 0), (0, 0, 1)])
    assert out[2] is None and ctx.exhausted
    assert calls == [("greedy: sensitivity", 1, 2), ("greedy: sensitivity", 2, 2)]


@pytest.mark.parametrize("thread_safe", [False, True])
def test_workers_hand_chunks_to_the_problem(thread_safe):
    problem = Counting(thread_safe=thread_safe)
    ctx = SearchContext(problem, Demands(), workers=2)
    ctx.evaluate([(1, 0, 0), (0, 1, 0), (0, 0, 1)])
    sizes = sorted(len(b) for b in problem.batches)
    assert sizes == ([1, 1, 1] if thread_safe else [1, 2])


def test_context_rejects_assignments_that_do_not_fit():
    ctx = SearchContext(Counting(), Demands())
    with pytest.raises(ValueError, match="does not fit"):
        ctx.evaluate([(0, 3, 0)])
    with pytest.raises(ValueError, match="does not fit"):
        ctx.evaluate([(0, 1)])


def test_a_problem_that_loses_candidates_is_a_bug():
    problem = Counting()
    problem.evaluate = lambda batch: []
    with pytest.raises(RuntimeError, match="returned 0 evaluations for 1"):
        SearchContext(problem, Demands()).evaluate([(1, 0, 0)])


def test_unknown_strategy_names_the_known_ones():
    with pytest.raises(SearchError, match="unknown search strategy 'annealing'; use one of greedy, evolutionary, rl"):  # fmt: skip
        search(Synthetic(3), Demands(), "annealing")
    assert issubclass(SearchError, TailorError)


def test_bad_budgets_and_problems_are_refused():
    with pytest.raises(SearchError, match="zero or more"):
        Budget(max_evaluations=-1)
    with pytest.raises(SearchError, match="positive"):
        Budget(max_seconds=0)
    empty = Synthetic(3)
    empty.units = []
    with pytest.raises(SearchError, match="no units"):
        search(empty, Demands())
    bad = Synthetic(3)
    bad.units[1].options = [Option("prune(0.3)", None, 0.3)]
    with pytest.raises(SearchError, match="unit 'unit1': option 0 must be keep"):
        search(bad, Demands())


def test_zero_budget_returns_the_baseline():
    p = Synthetic(4)
    r = search(p, Demands(), "greedy", budget=Budget(max_evaluations=0))
    assert r.best == (0, 0, 0, 0) and r.evaluations == 0 and r.feasible
    assert r.metrics == p.baseline and p.calls == []
    assert r.front == [((0, 0, 0, 0), p.baseline)]


def test_unit_features_default_to_empty():
    assert Unit("u", [Option("keep")]).features.shape == (0,)
    assert np.asarray(Synthetic(2).units[0].features).shape == (4,)


def test_strategy_settings_are_checked():
    with pytest.raises(SearchError, match="strategy rl takes the settings episodes, batch"):
        search(Synthetic(3), Demands(), "rl", settings={"population": 10})
    r = search(
        Synthetic(3), Demands(), "evolutionary", settings={"population": 4, "generations": 1}
    )
    assert r.evaluations <= 8
