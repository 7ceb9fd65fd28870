"""What every strategy owes: the same result for the same seed, failures as data, unmet
budgets reported with the closest plan, progress, and the budget honoured."""

from __future__ import annotations

import pytest

from tailor.demands import Demands
from tailor.search.base import STRATEGIES, Budget, Scorer, search
from tests.search import Synthetic

BUDGET = {"greedy": None, "evolutionary": 60, "rl": 40}


def _budget(strategy: str) -> Budget:
    return Budget(max_evaluations=BUDGET[strategy])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_seed_same_search(strategy):
    runs = []
    for _ in range(2):
        p = Synthetic(6, 3)
        runs.append(search(p, Demands(), strategy, seed=7, budget=_budget(strategy)))
    a, b = runs
    assert [h[0] for h in a.history] == [h[0] for h in b.history]
    assert (a.best, a.metrics, a.front) == (b.best, b.metrics, b.front)
    assert a.strategy == strategy and a.evaluations == len(a.history)


@pytest.mark.parametrize("strategy", ["evolutionary", "rl"])
def test_another_seed_another_search(strategy):
    a = search(Synthetic(6, 3), Demands(), strategy, seed=1, budget=_budget(strategy))
    b = search(Synthetic(6, 3), Demands(), strategy, seed=2, budget=_budget(strategy))
    assert [h[0] for h in a.history] != [h[0] for h in b.history]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_failing_candidates_are_data(strategy):
    # Every plan that quantizes unit 2 or prunes unit 4 hard fails to build.
    p = Synthetic(6, 0, fail=lambda a: a[2] == 3 or a[4] == 2)
    r = search(p, Demands(), strategy, seed=0, budget=_budget(strategy))
    failed = [a for a, e in r.history if e.metrics is None]
    assert failed and all(
        e.error.startswith("pass failed") for _, e in r.history if e.metrics is None
    )
    assert r.best[2] != 3 and r.best[4] != 2
    assert r.feasible and r.metrics["latency"] < p.baseline["latency"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_everything_failing_leaves_the_baseline(strategy):
    p = Synthetic(4, 0, fail=lambda a: True)
    r = search(p, Demands(), strategy, seed=0, budget=Budget(max_evaluations=30))
    assert r.best == (0, 0, 0, 0) and r.metrics == p.baseline and r.feasible
    assert r.evaluations > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unmet_budget_reports_the_closest_plan(strategy):
    p = Synthetic(6, 1)
    # No plan saves 65 % of the latency (60 % at most).
    d = Demands(max_accuracy_drop=0.01, max_latency_ms=0.35 * p.baseline["latency"])
    r = search(p, d, strategy, seed=0, budget=_budget(strategy))
    assert not r.feasible
    assert r.unmet and any(u.startswith("latency") for u in r.unmet)
    scorer = Scorer(d, p.baseline)
    closest = min(scorer.violation(e.metrics) for _, e in r.history if e.metrics is not None)
    assert scorer.violation(r.metrics) == pytest.approx(closest)
    assert r.metrics["latency"] < 0.75 * p.baseline["latency"]  # it went some way


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_progress_and_budget(strategy):
    calls = []
    p = Synthetic(6, 2)
    r = search(
        p,
        Demands(),
        strategy,
        budget=Budget(max_evaluations=25),
        progress=lambda message, done, total: calls.append((message, done, total)),
    )
    assert r.evaluations == len(p.calls) <= 25
    assert calls and calls[-1][1:] == (r.evaluations, 25)
    assert all(m.startswith(strategy) for m, _, _ in calls)
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_time_budget_stops_the_search(strategy, monkeypatch):
    import tailor.search.base as base

    clock = iter(range(10**6))  # each reading of the clock: one more second
    monkeypatch.setattr(base.time, "monotonic", lambda: float(next(clock)))
    p = Synthetic(6, 2)
    r = search(p, Demands(), strategy, budget=Budget(max_seconds=6))
    assert 0 < r.evaluations < 6 and r.evaluations == len(p.calls)
