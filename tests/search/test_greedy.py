"""Greedy search: sensitivity first, then ratio-ranked steps checked for real, a polish;
budgets met, close to the brute-force optimum, interactions caught."""

from __future__ import annotations

import pytest

from tailor.demands import Demands
from tailor.search.base import Budget, search
from tests.search import Synthetic, brute_force, true_score


def _latency_budget(p: Synthetic) -> Demands:
    return Demands(
        max_accuracy_drop=0.02,
        max_latency_ms=0.6 * p.baseline["latency"],
        weights={"accuracy": 0.5, "storage": 0.5},
    )


def single(i: int, j: int, n: int = 6) -> tuple[int, ...]:
    """Option `j` on unit `i`, every other unit kept."""
    return tuple(j if k == i else 0 for k in range(n))


def test_sensitivity_of_every_single_option_comes_before_the_steps():
    p = Synthetic(5)
    r = search(p, Demands(), "greedy")
    singles = {tuple(j if k == i else 0 for k in range(5)) for i in range(5) for j in (1, 2, 3)}
    # The mildest option of each family (prune 0.3, quantize) first, then the 3 uniform
    # plans, then the other options alone; steps only after that.
    first = [a for a, _ in r.history[:18]]
    assert {max(a) for a in first[:10]} == {1, 3} and set(first[:10]) < singles
    assert all(len(set(a)) == 1 for a in first[10:13])
    assert set(first[:10] + first[13:18]) == singles
    assert p.calls[:18] == first


@pytest.mark.parametrize("seed", [0, 2, 3])
@pytest.mark.parametrize("demands", ["default", "latency"])
def test_greedy_meets_the_budget_near_the_optimum(seed, demands):
    p = Synthetic(6, seed)
    d = Demands(max_accuracy_drop=0.01) if demands == "default" else _latency_budget(p)
    best, best_score = brute_force(p, d)
    r = search(p, d, "greedy")
    assert r.feasible and r.unmet == []
    assert r.metrics["latency"] <= (d.max_latency_ms or float("inf"))
    # Within 5 % of the optimum's objective, in a fraction of the 4096 plans.
    assert true_score(p, d, r.metrics) <= best_score * 1.05 + 1e-9
    assert r.evaluations < 60


def test_steps_are_checked_for_real_so_an_interaction_is_caught():
    # Pruning units 0 and 1 costs 1 point each alone but 4 together: the additive
    # prediction (2 points) would pass a 3-point budget. Everything else costs 5 points.
    p = Synthetic(3, 0)
    p.loss[:, 1:] = 0.05
    p.loss[:2, 1:3] = 0.01
    p.interaction = 0.02
    d = Demands(max_accuracy_drop=0.03, weights={"latency": 1.0})
    r = search(p, d, "greedy")
    tried = [a for a, _ in r.history]
    assert any(a[0] in (1, 2) and a[1] in (1, 2) for a in tried)  # measured, then rejected
    assert r.feasible and r.metrics["accuracy"] == pytest.approx(0.89)
    assert sum(c != 0 for c in r.best) == 1 and r.best[2] == 0


def test_greedy_stops_at_the_evaluation_budget():
    p = Synthetic(6, 0)
    r = search(p, _latency_budget(p), "greedy", budget=Budget(max_evaluations=10))
    assert r.evaluations <= 10 and r.evaluations == len(p.calls)


def test_without_budgets_greedy_stops_when_nothing_improves():
    p = Synthetic(4, 1)
    r = search(p, Demands(max_accuracy_drop=0.01), "greedy")
    again = search(p, Demands(max_accuracy_drop=0.01), "greedy", budget=Budget(max_evaluations=500))
    assert r.evaluations == again.evaluations < 500


def test_workers_evaluate_several_steps_at_once():
    p = Synthetic(6, 0)
    d = _latency_budget(p)
    one = search(p, d, "greedy")
    three = search(Synthetic(6, 0), d, "greedy", workers=3)
    assert three.feasible
    assert true_score(p, d, three.metrics) <= true_score(p, d, one.metrics) * 1.05


def test_a_tight_budget_measures_the_mildest_options_first_and_leaves_room_for_steps():
    p = Synthetic(8, 0)
    d = _latency_budget(p)
    r = search(p, d, "greedy", budget=Budget(max_evaluations=30))
    singles = [a for a, _ in r.history if sum(c != 0 for c in a) == 1]
    # Each unit's mildest option of each family (prune 0.3, quantize) comes first.
    assert {max(a) for a in singles[:16]} == {1, 3}
    assert len(singles) < 24  # not every option was measured alone
    # Room was left for the 3 uniform plans and for steps from the best of them.
    multi = [a for a, _ in r.history if sum(c != 0 for c in a) > 1]
    assert len(multi) > 3 and r.evaluations <= 30
    assert sum(c != 0 for c in r.best) > 1  # a per-layer plan, not one unit changed


def test_a_time_budget_ends_each_phase_at_its_share():
    from types import SimpleNamespace

    from tailor.search.greedy import _room

    ctx = SimpleNamespace(budget=Budget(max_seconds=100.0), evaluations=8, elapsed=20.0)
    # 2.5 s per evaluation: 8 more fit before 40 s, 36 before the end.
    assert _room(ctx, 0.4) == 8 and _room(ctx, 1.0) == 32
    ctx.elapsed = 50.0  # past the share: nothing more
    assert _room(ctx, 0.4) == 0
    ctx.budget = Budget(max_seconds=100.0, max_evaluations=20)
    assert _room(ctx, 1.0) == 8  # 6.25 s each: 8 by time, 12 by count
    ctx.budget, ctx.evaluations, ctx.elapsed = Budget(max_seconds=10.0), 0, 0.0
    assert _room(ctx, 0.5) == 1  # no rate yet: one evaluation to measure it
    ctx.budget = Budget()
    assert _room(ctx, 0.4) is None


def test_uniform_plans_go_in_the_order_the_sensitivities_promise():
    p = Synthetic(6, 0)
    d = Demands(max_accuracy_drop=0.05, weights={"latency": 1.0})
    r = search(p, d, "greedy", budget=Budget(max_evaluations=20))
    uniform = [a for a, _ in r.history if len(set(a)) == 1]
    # prune 60 % saves the most time: with every option measured it would go first; here
    # only the mildest ones were (prune 30 %, int8), and prune 30 % saves less than int8.
    assert uniform[0] == (3,) * 6


def test_a_uniform_plan_that_breaks_the_accuracy_budget_is_repaired():
    # int8 everywhere is the best plan by far, but two units lose 3 points each with it;
    # every other option costs more than the budget on every unit. The repair backs the
    # two sensitive units off and the plan keeps int8 on the rest.
    p = Synthetic(6, 0)
    p.loss[:, 1:3] = 0.05
    p.loss[:, 3] = 0.001
    p.loss[[1, 4], 3] = 0.03
    d = Demands(max_accuracy_drop=0.02, weights={"latency": 0.5, "storage": 0.5})
    r = search(p, d, "greedy")
    tried = [a for a, _ in r.history]
    # 18 options alone and 3 uniform plans; int8 everywhere breaks the budget ...
    assert sum(sum(c != 0 for c in a) == 1 for a in tried[:21]) == 18
    assert not d.accuracy_floor(0.9) <= r.history[tried.index((3,) * 6)][1].metrics["accuracy"]
    # ... and is repaired with one evaluation, before any step.
    assert tried[21] == (3, 0, 3, 3, 0, 3)
    assert r.feasible and r.best == (3, 0, 3, 3, 0, 3)
    best, best_score = brute_force(p, d)
    assert r.best == best and true_score(p, d, r.metrics) == pytest.approx(best_score)


def test_repair_scales_its_prediction_by_the_interaction_it_saw():
    from tailor.search.greedy import _repair

    # Alone each unit's int8 loses 0.4 points, together 8 units lose 6 points (not 3.2):
    # the repair must back off more units than the additive prediction says.
    class Interacting(Synthetic):
        def metrics(self, a):
            m = super().metrics(a)
            k = sum(c == 3 for c in a)
            m["accuracy"] -= 0.0035 * max(k - 1, 0)
            return m

    p = Interacting(8, 0)
    p.loss[:, 3] = 0.004
    d = Demands(max_accuracy_drop=0.02)
    from tailor.search.base import SearchContext

    ctx = SearchContext(p, d)
    ctx.evaluate([(3,) * 8] + [tuple(3 if k == i else 0 for k in range(8)) for i in range(8)])

    def single(i, j):
        return tuple(j if k == i else 0 for k in range(8))

    fixed = _repair(ctx, (3,) * 8, single, d.accuracy_floor(p.baseline["accuracy"]))
    assert fixed is not None and ctx.scorer.feasible(ctx.metrics(fixed))
    # One evaluation sufficed: the scaled prediction was right the first time.
    assert len(ctx.history) == 10 and 0 < sum(c == 3 for c in fixed) < 8


def test_only_plans_whose_back_off_promises_a_better_plan_are_repaired():
    from tailor.search.base import SearchContext
    from tailor.search.greedy import _back_off, _repairable

    # Prune 0.3 everywhere loses 1.8 points (within the 2-point budget); int8
    # everywhere scores better as it is but loses 7.2. Every unit backed off from int8
    # (to keep or to prune 0.3) leaves at best prune 0.3 everywhere: no better than the
    # plan in hand, so repairing int8 would only spend evaluations.
    p = Synthetic(6, 0)
    p.interaction = 0.0
    p.loss[:, 1] = 0.003
    p.loss[:, 2] = 0.05
    p.loss[:, 3] = 0.012
    d = Demands(max_accuracy_drop=0.02, weights={"latency": 0.5, "storage": 0.5})
    ctx = SearchContext(p, d)

    int8, prune, strong = (3,) * 6, (1,) * 6, (2,) * 6
    ctx.evaluate([(0,) * 6, int8, prune, strong])
    ctx.evaluate([single(i, j) for i in range(6) for j in (1, 2, 3)])
    objective = ctx.scorer.objective
    assert objective(ctx.metrics(int8)) < objective(ctx.metrics(prune))
    floor = d.accuracy_floor(p.baseline["accuracy"])
    assert _repairable(ctx, [int8, prune, strong], prune, single, floor) == []
    # From keep, both broken plans are worth repairing, the better back-off first.
    found = _repairable(ctx, [int8, prune, strong], (0,) * 6, single, floor)
    assert set(found) == {int8, strong}
    values = [objective(_back_off(ctx, c, ctx.metrics(c), single, floor)[1]) for c in found]
    assert values == sorted(values)


def test_storage_passes_count_as_one_family_in_the_first_measurements():
    import numpy as np

    from tailor.search.base import Option, Unit
    from tailor.search.greedy import _sensitivity_order

    options = [
        Option("keep"),
        Option("quantize_weights(bits=4)", None, 0.4),
        Option("cluster_weights(16)", None, 0.4),
        Option("quantize(int8)", None, 0.5),
        Option("tucker2(rank=0.5)", None, 0.4),
        Option("tucker2(rank=0.5)+4bit", None, 0.7),
    ]
    core, rest = _sensitivity_order([Unit("conv", options, np.zeros(4))])
    # 4-bit weights and a 16-entry codebook both shrink the file: the milder (first) is
    # measured with the other families' mildest, the codebook with the rest.
    assert core == [(0, 1), (0, 4), (0, 3)]
    assert rest == [(0, 2), (0, 5)]


def test_back_off_from_an_earlier_search_by_the_accuracy_seen_elsewhere():
    from tailor.search.base import SearchContext
    from tailor.search.greedy import BackOff

    # int8 everywhere loses 0.4 points a unit alone (2.4 in all, additive): over a 2-point
    # budget. Told it really loses 3.0 (what held-out data showed), the back-off must
    # move more units than for its own 2.4, and the plan must come from the history.
    p = Synthetic(6, 0)
    p.interaction = 0.0
    p.loss[:, 3] = 0.004
    d = Demands(max_accuracy_drop=0.02)
    ctx = SearchContext(p, d)
    int8 = (3,) * 6
    ctx.evaluate([(0,) * 6, int8] + [tuple(j if k == i else 0 for k in range(6)) for i in range(6) for j in (1, 2, 3)])  # fmt: skip
    base = p.baseline["accuracy"]
    back_off = BackOff(p, d, ctx.history)
    own, worse = back_off(int8, ctx.metrics(int8)["accuracy"]), back_off(int8, base - 0.03)
    assert own is not None and worse is not None
    assert sum(c == 3 for c in worse[0]) < sum(c == 3 for c in own[0]) < 6
    # The prediction: within the budget, and costlier than int8 everywhere (the scale of
    # the search: the objective it ranked by).
    assert worse[1]["accuracy"] >= base - 0.02 - 1e-12
    assert back_off.objective(worse[1]) > back_off.objective(ctx.metrics(int8))
    assert back_off.objective(ctx.metrics(int8)) == pytest.approx(
        ctx.scorer.objective(ctx.metrics(int8), clip=False)
    )
    # A plan the search never saw is backed off from the metrics given for it.
    again = back_off(worse[0], base - 0.025, worse[1])
    assert again is not None and sum(c == 3 for c in again[0]) < sum(c == 3 for c in worse[0])
    # Nothing to back off: a plan already within the budget, one never seen, no budget.
    assert back_off(int8, base - 0.01) is None
    assert back_off((1,) * 6, base - 0.03) is None
    assert BackOff(p, Demands(max_accuracy_drop=None), ctx.history)(int8, 0.0) is None


def test_back_off_moves_only_to_options_that_compute_no_less():
    from tailor.search.base import SearchContext
    from tailor.search.greedy import _back_off

    # int8 everywhere loses 2.4 points (budget 2). Alone, prune 0.3 loses nothing and
    # int8 0.4 a unit: by accuracy alone, int8 -> prune 0.3 is the cheapest "back-off".
    # But pruning computes less than int8 (fewer MACs): it is another compression, not a
    # milder one, and in a plan its loss alone is no guide (on UCI HAPT such a move read
    # +0.97 alone and -8 points in the plan). Only keep is milder than int8.
    class Counted(Synthetic):
        def metrics(self, a):
            m = super().metrics(a)
            m["macs"] = float(sum(1e6 * (1 - (0.0, 0.3, 0.6, 0.0)[j]) for j in a))
            return m

    def context(problem, plan):
        ctx = SearchContext(problem, d)
        ctx.evaluate([(0,) * 6, plan] + [single(i, j) for i in range(6) for j in (1, 2, 3)])
        return ctx

    d = Demands(max_accuracy_drop=0.02, weights={"latency": 0.5, "storage": 0.5})
    p = Counted(6, 0)
    p.interaction = 0.0
    p.loss[:, 1] = 0.0
    p.loss[:, 3] = 0.004
    int8 = (3,) * 6
    ctx = context(p, int8)
    floor = d.accuracy_floor(p.baseline["accuracy"])
    backed, predicted = _back_off(ctx, int8, ctx.metrics(int8), single, floor)
    assert set(backed) == {0, 3} and predicted["accuracy"] >= floor

    # Storing less is no bar: from prune 0.6 (0.6 points a unit), int8 computes more and
    # stores less; lossless here, it wins back twice what prune 0.3 does at less cost, so
    # every move goes there (keep would give up every saving).
    p = Counted(6, 0)
    p.interaction = 0.0
    p.loss[:, 1], p.loss[:, 2], p.loss[:, 3] = 0.003, 0.006, 0.0
    prune = (2,) * 6
    ctx = context(p, prune)
    backed, predicted = _back_off(ctx, prune, ctx.metrics(prune), single, floor)
    assert set(backed) == {2, 3} and predicted["accuracy"] >= floor
    assert predicted["storage"] < ctx.metrics(prune)["storage"]
