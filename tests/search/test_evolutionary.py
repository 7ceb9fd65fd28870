"""NSGA-II: constrained non-dominated sorting, crowding distance, and a front that holds
the constrained optimum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tailor.demands import Demands
from tailor.search.base import Budget, search
from tailor.search.evolutionary import crowding_distance, non_dominated_sort
from tests.search import Synthetic, brute_force, true_score


def test_non_dominated_sort_puts_feasible_first_then_smaller_violations():
    objectives = np.array([[1.0, 1.0], [2.0, 2.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    violations = np.array([0.0, 0.0, 0.0, 0.5, 0.2, math.inf])
    fronts = non_dominated_sort(objectives, violations)
    assert fronts == [[0, 2], [1], [4], [3], [5]]


def test_crowding_distance_favours_the_ends_and_sparse_points():
    objectives = np.array([[0.0, 4.0], [1.0, 3.0], [3.0, 1.0], [4.0, 0.0], [3.5, 0.5]])
    d = crowding_distance(objectives)
    assert math.isinf(d[0]) and math.isinf(d[3])
    assert d[1] > d[4]  # (1, 3) has more room around it than (3.5, 0.5)
    assert np.all(np.isinf(crowding_distance(objectives[:2])))


def test_first_population_is_keep_uniform_strengths_and_single_options():
    p = Synthetic(6, 0)
    r = search(p, Demands(), "evolutionary", budget=Budget(max_evaluations=30))
    first = [a for a, _ in r.history[:11]]
    assert first[:3] == [(1,) * 6, (3,) * 6, (2,) * 6]  # strengths nearest 1/4, 1/2, 3/4
    assert all(sum(c != 0 for c in a) == 1 for a in first[3:])


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_front_is_non_dominated_and_holds_the_constrained_optimum(seed):
    p = Synthetic(6, seed)
    d = Demands(
        max_accuracy_drop=0.02,
        max_latency_ms=0.6 * p.baseline["latency"],
        weights={"accuracy": 0.5, "storage": 0.5},
    )
    _, best_score = brute_force(p, d)
    r = search(p, d, "evolutionary", seed=seed, budget=Budget(max_evaluations=300))
    keys = ("latency", "storage")  # a budget or a weight each
    vec = np.array([[-m["accuracy"], *(m[k] for k in keys)] for _, m in r.front])
    for v in vec:
        assert not np.any(np.all(vec <= v, axis=1) & np.any(vec < v, axis=1))
    seen = [m for _, e in r.history if (m := e.metrics) is not None]
    assert len(r.front) < len(seen)
    feasible = [m for _, m in r.front if not d.violations(m, p.baseline["accuracy"])]
    assert feasible
    assert min(true_score(p, d, m) for m in feasible) <= best_score * 1.05 + 1e-9
    assert r.feasible and true_score(p, d, r.metrics) <= best_score * 1.05 + 1e-9


def test_evolutionary_stops_when_no_new_plan_comes():
    p = Synthetic(2, 0)  # 16 plans in all
    r = search(p, Demands(), "evolutionary", seed=0)
    assert r.evaluations <= 15
