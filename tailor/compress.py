"""`tailor compress`: choose, layer by layer, the passes that best meet the user's demands
on a target, then apply them and report.

The scheduler is the one room that combines the others (DESIGN.md): the candidate space
comes from the IR (`tailor.space`), candidates are built by the passes, judged by an
evaluator (`tailor.evaluate`) and by the target's cost models (`tailor.costing`), and
searched by a strategy (`tailor.search`). The result is a :class:`~tailor.plan.Plan`, the
model it gives, and a report.

Accuracy is searched on one part of the labelled data and verified on the other (never
on the calibration set the passes fit to): the search's best candidates are checked on
the held-out part, best objective first, those not sure enough backed off by what the
held-out part showed, and the first that keeps the budget with the asked confidence (that
a fresh test set as large as the labelled data reads it within the budget) is applied
(selection, then confirmation); if none does, the closest is reported as unmet.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Protocol

import numpy as np

from tailor.demands import Demands
from tailor.errors import TailorError
from tailor.evaluate import (
    Evaluator,
    Fidelity,
    TopOneAccuracy,
    paired_standard_error,
    split_samples,
)
from tailor.ir.model import Model
from tailor.plan import Plan, model_digest, pipeline_text
from tailor.search.base import Budget, Evaluation, SearchResult, Unit, search
from tailor.search.cache import CachedProblem
from tailor.search.greedy import BackOff
from tailor.space import SpaceConfig, assignment_layers, build_space

__all__ = ["ModelProblem", "CompressResult", "compress", "confirmation_summary"]

logger = logging.getLogger(__name__)

CostFn = Callable[[Model], dict[str, Any]]


class ModelProblem:
    """The search problem of one model: build a candidate with the passes, then measure it.

    Failures of one candidate (a pass refusing a layer, a checker error) come back as an
    :class:`Evaluation` with the error, so the search goes on.
    """

    def __init__(
        self,
        model: Model,
        units: Sequence[Unit],
        *,
        calibration: Mapping[str, np.ndarray],
        evaluator: Evaluator,
        costs: CostFn,
        seed: int = 0,
        workers: int = 1,
    ):
        self.model = model
        self.units = list(units)
        self.calibration = dict(calibration)
        self.evaluator = evaluator
        self.costs = costs
        self.seed = seed
        self.workers = max(int(workers), 1)
        self._pool: Any = None
        self._base_samples: np.ndarray | None = None
        self.baseline = self._measure_baseline(model)

    def _measure_baseline(self, model: Model, *, warm_seconds: float = 1.0) -> dict[str, float]:
        """The baseline's metrics; its costs after `warm_seconds` of timing it (a machine
        that was idle reads slow for a while: on this project's 2-core VM the first
        timings of a ResNet read 0.84-0.87 ms, then 0.69 steadily, and every candidate's
        change from the baseline inherits that error), the median-latency one of three."""
        metrics, start = self._accuracy(model), time.perf_counter()
        first = self._costs(model)
        if getattr(self.costs, "sources", {}).get("latency") != "measured":
            return metrics | first  # predicted: the same every time
        while time.perf_counter() - start < warm_seconds:
            self._costs(model)
        runs = sorted((self._costs(model) for _ in range(3)), key=lambda m: m.get("latency", 0.0))
        if hasattr(self.costs, "set_reference"):
            # Candidates are timed beside the baseline from now on (see set_reference).
            self.costs.set_reference(model, runs[1]["latency"])
        return metrics | runs[1]

    def _costs(self, model: Model) -> dict[str, float]:
        return {
            key: float(value.value if hasattr(value, "value") else value)
            for key, value in self.costs(model).items()
        }

    def pipeline(self, assignment: Sequence[int]) -> str:
        """The pipeline that builds a candidate from :attr:`model`, which is already fused
        (the plan's own pipeline starts with `fuse`, for the original model)."""
        return pipeline_text(assignment_layers(self.model, self.units, assignment), prefix="")

    def build(self, assignment: Sequence[int]) -> Model:
        """The candidate model of an assignment."""
        if not any(assignment):
            return self.model.copy()
        return _build(self.model, self.pipeline(assignment), self.calibration, self.seed)

    def measure(self, model: Model) -> dict[str, float]:
        """The model's metrics. With an evaluator that scores each sample, `accuracy` is
        the measured score less one paired standard error of its change from the
        baseline (`accuracy_measured`, `accuracy_se`): a candidate is credited only with
        what its samples support, so choosing among many does not pick lucky ones."""
        return self._accuracy(model) | self._costs(model)

    def _accuracy(self, model: Model) -> dict[str, float]:
        per = self.evaluator.per_sample(model) if _scores_samples(self.evaluator) else None
        if per is None:
            return {"accuracy": float(self.evaluator(model))}
        measured = float(per.mean())
        if self._base_samples is None:  # the first model measured is the baseline
            self._base_samples = per
        se = paired_standard_error(self._base_samples, per)
        return {"accuracy": measured - se, "accuracy_measured": measured, "accuracy_se": se}

    def evaluate(self, assignments: list[tuple[int, ...]]) -> list[Evaluation]:
        if self.workers > 1 and len(assignments) > 1:
            return self._evaluate_parallel(assignments)
        out = []
        for assignment in assignments:
            start = time.perf_counter()
            try:
                metrics = self.measure(self.build(assignment))
                out.append(Evaluation(metrics, None, time.perf_counter() - start))
            except TailorError as e:
                logger.info("candidate %s failed: %s", assignment, e)
                out.append(Evaluation(None, str(e), time.perf_counter() - start))
        return out

    def _evaluate_parallel(self, assignments: list[tuple[int, ...]]) -> list[Evaluation]:
        """Builds the candidates in worker processes; scores and times them here, one at
        a time, so two timings never share the cores."""
        import concurrent.futures as cf
        import multiprocessing

        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(self.model.to_bytes(), self.calibration, self.seed),
            )
        start = time.perf_counter()
        futures = [
            self._pool.submit(_worker_build, self.pipeline(a)) if any(a) else None
            for a in assignments
        ]
        out = []
        for assignment, future in zip(assignments, futures, strict=True):
            try:
                if future is None:
                    model = self.model.copy()
                else:
                    data, error = future.result()
                    if error is not None:
                        raise TailorError(error)
                    model = Model.load(data)
                out.append(Evaluation(self.measure(model), None, time.perf_counter() - start))
            except TailorError as e:
                logger.info("candidate %s failed: %s", assignment, e)
                out.append(Evaluation(None, str(e), time.perf_counter() - start))
        return out

    def close(self, *, wait: bool = True) -> None:
        """Stops the worker processes (if any); `wait=False` ends them at once, dropping
        the candidates they were building (a stopped search)."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if not wait:
            # concurrent.futures offers no way to end running workers before Python
            # 3.14's terminate_workers(); a stopped search must not leave them running.
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
        pool.shutdown(wait=wait, cancel_futures=True)


_WORKER: dict[str, Any] = {}


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """SIGTERM (`kill`, a CI timeout) raises SystemExit while the search runs, so worker
    processes are ended and the resumable state is flushed as on Ctrl-C. Only the main
    thread can install handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_init(model_bytes: bytes, calibration: dict[str, np.ndarray], seed: int) -> None:
    import os as _os

    # Each worker is one of several processes on the machine: one BLAS thread each.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        _os.environ.setdefault(name, "1")
    _WORKER.update(model=Model.load(model_bytes), calibration=calibration, seed=seed)


def _worker_build(pipeline: str) -> tuple[bytes | None, str | None]:
    """Runs one candidate's pipeline in a worker; errors come back as text."""
    try:
        model = _build(_WORKER["model"], pipeline, _WORKER["calibration"], _WORKER["seed"])
        return model.to_bytes(), None
    except TailorError as e:
        return None, str(e)


def _build(model: Model, pipeline: str, calibration: Mapping[str, np.ndarray], seed: int) -> Model:
    """A candidate: `pipeline` run on the (checked) search model, and the result checked
    once at the end rather than after every pass (candidates are many; the plan that is
    finally applied gets the full check)."""
    from tailor.api import run_pipeline
    from tailor.passes.manager import check_model

    result = run_pipeline(model, pipeline, calibration=calibration, check="none", seed=seed)
    if result.modified:
        check_model(result.model, full=False)
    return result.model


@dataclass
class CompressResult:
    """What `compress` produced: the plan, the model, and where they were written."""

    plan: Plan
    model: Model
    search: SearchResult
    baseline: dict[str, Any]
    result: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    #: The assignment applied: the search's best, or the first of its ranking that held
    #: on the held-out part (see :func:`_confirm`).
    chosen: tuple[int, ...] = ()


def _search_key(
    model_bytes: bytes, target: str, demands: Demands, units: Sequence[Unit], extra: str
) -> str:
    text = json.dumps(
        {
            "model": model_digest(model_bytes),
            "target": target,
            "demands": demands.as_dict(),
            "space": [[u.name, [o.label for o in u.options]] for u in units],
            "extra": extra,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _evaluators(
    reference: Model,
    calibration: Mapping[str, np.ndarray],
    labels: tuple[np.ndarray, np.ndarray] | None,
    evaluator: Evaluator | None,
    seed: int,
) -> tuple[Evaluator, Evaluator, dict[str, np.ndarray], str]:
    """(search evaluator, held-out evaluator, calibration for the passes, what they are)."""
    if evaluator is not None:
        return evaluator, evaluator, dict(calibration), f"{evaluator.name} (the user's evaluator)"
    if labels is not None:
        x, y = labels
        search_idx, held_idx = split_samples((x,), 0.5, seed)
        return (
            TopOneAccuracy(x[search_idx], y[search_idx]),
            TopOneAccuracy(x[held_idx], y[held_idx]),
            dict(calibration),
            f"top-1 accuracy: searched on {len(search_idx)} labelled samples, "
            f"verified on the other {len(held_idx)}",
        )
    # No labels: fidelity to the original model, on calibration samples the passes never see.
    arrays = dict(calibration)
    if len(arrays) != 1:
        raise TailorError(
            "without --labels or --eval, fidelity needs a one-input model; pass --labels FILE.npz"
        )
    ((name, x),) = arrays.items()
    if len(x) < 8:
        raise TailorError(f"calibration data hold {len(x)} samples; fidelity needs at least 8")
    fit_idx, eval_idx = split_samples((x,), 0.5, seed)
    search_idx, held_idx = eval_idx[: len(eval_idx) // 2], eval_idx[len(eval_idx) // 2 :]
    return (
        Fidelity(reference, x[search_idx]),
        Fidelity(reference, x[held_idx]),
        {name: x[fit_idx]},
        f"fidelity (top-1 agreement with the original; no labels given): calibration split "
        f"{len(fit_idx)} for the passes, {len(search_idx)} search, {len(held_idx)} held out",
    )


#: Candidates checked on the held-out part at most (each is built and scored once more).
CONFIRM = 12

#: With a search time limit, the confirmation checks new candidates for at most this share
#: of it (and at least a minute).
CONFIRM_SHARE = 0.25

#: How sure the confirmation must be that a plan keeps the accuracy budget: the plan's
#: held-out accuracy less `z` standard errors of its change must reach the floor, with `z`
#: the normal quantile of this probability (0.8: z = 0.84). 0.5 asks only that the
#: held-out reading itself meet the budget. The error is that of a prediction for a fresh
#: test set (see :func:`prediction_error`).
CONFIDENCE = 0.8


def budget_confidence(change_points: float, se_points: float, budget_points: float) -> float:
    """How sure one can be that a plan keeps an accuracy budget, from its reading on
    held-out data: the normal probability that the true change is above `-budget`, given a
    measured change with its paired standard error (all in points). A reading with no
    error (nothing changed, or a user's evaluator) is sure either way."""
    margin = change_points + budget_points
    if se_points <= 0:
        return 1.0 if margin >= -1e-9 else 0.0
    return float(NormalDist().cdf(margin / se_points))


def prediction_error(se: float, held_samples: int, test_samples: int | None) -> float:
    """The standard error of a plan's change in accuracy as a fresh test set of
    `test_samples` would read it, predicted from a reading on `held_samples` with paired
    standard error `se`: the reading's own error and the fresh set's sampling error add up
    (that one is `se` scaled by the square root of `held_samples / test_samples`). None
    or 0: the error of the reading alone, about the plan's true accuracy.

    A plan that reads 0.42 points down on 718 held-out samples, error 0.67, keeps a
    1-point budget with 81 % confidence in its true accuracy but reads within it on a
    fresh set of 1,437 with 76 % only; such a plan read 1.04 points down on one (UCI HAPT,
    benchmarks/README.md). Users judge a model on a finite test set: the confirmation
    asks for the second."""
    if not test_samples or held_samples <= 0:
        return se
    return se * math.sqrt(1.0 + held_samples / test_samples)


def _held_reading(
    held_eval: Evaluator, model: Model, base_samples: np.ndarray | None
) -> tuple[float, float]:
    """(held-out score, paired standard error of its change from the baseline)."""
    if base_samples is None:
        return float(held_eval(model)), 0.0
    per = held_eval.per_sample(model)
    return float(per.mean()), paired_standard_error(base_samples, per)


class _Backer(Protocol):
    """What the confirmation needs of a back-off (:class:`tailor.search.greedy.BackOff`)."""

    def objective(self, metrics: Mapping[str, float]) -> float: ...

    def __call__(
        self, plan: Sequence[int], accuracy: float, metrics: Mapping[str, float] | None = None
    ) -> tuple[tuple[int, ...], dict[str, float]] | None: ...


#: Back-offs in a row from one plan of the search's ranking (see :func:`_confirm`).
BACK_OFFS = 2

#: Units in which a plan may differ from one that failed the confirmation and still be
#: judged by that one's reading (and in at most a quarter of the units that one
#: changes; see :func:`_confirm`).
NEAR = 2


def _search_accuracy(metrics: Mapping[str, float]) -> float:
    """A plan's plain accuracy reading in the search (not less its standard error)."""
    return float(metrics.get("accuracy_measured", metrics["accuracy"]))


def _confirm(
    problem: ModelProblem,
    result: SearchResult,
    held_eval: Evaluator,
    demands: Demands,
    base_held: float,
    *,
    limit: int = CONFIRM,
    confidence: float = CONFIDENCE,
    base_samples: np.ndarray | None = None,
    test_samples: int | None = None,
    max_seconds: float | None = None,
    back_off: _Backer | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> tuple[tuple[int, ...], list[dict[str, Any]]]:
    """Selection, then confirmation.

    The search picked its best among many candidates on its own part of the data, so
    the best is partly chosen for luck (the winner's curse: on UCI HAPT's 719-sample
    search part, plans that read +0.4 to +1.1 points there read -0.8 to -2.1 on the
    held-out part). The candidates that met every budget in the search are checked on
    the held-out part, best objective first, and the first that keeps the accuracy
    budget there with the asked `confidence` is the plan: its held-out accuracy less `z`
    paired standard errors of its change from the baseline (`base_samples`, the
    baseline's per-sample scores) reaches the floor. One reading on a few hundred
    samples is too noisy to be taken at its face: a plan reading 0.84 points down with
    an error of 0.62 keeps a 1-point budget with 60 % confidence, and then read 1.04
    points down on a second, independent half. With `test_samples` the confidence is
    that a fresh test set of that many samples reads the plan within the budget (the
    error of :func:`prediction_error`), not only that its true accuracy is.

    With `back_off` (the search's sensitivities), a candidate that is not sure enough
    is backed off by what the held-out part showed of it (its change there less the
    margin) and the milder plan joins the candidates at the objective the
    sensitivities predict for it, up to :data:`BACK_OFFS` times in a row: it is checked
    when no candidate left promises more, so it competes with the next of the ranking
    rather than winning by coming first (a back-off that recovers more than it had to
    costs objective). The search's best plans are often near-duplicates that fail
    together (vgg, seed 1: the 8 best read 1.3 to 1.9 points down on the held-out
    part): a candidate of the ranking that differs in at most :data:`NEAR` units, and
    in at most a quarter of those it changes, from one of the ranking that failed is
    judged by that one's held-out reading, shifted by their difference in the search;
    if that breaks the budget, its back-off joins the queue and it is put off until
    every other candidate has been checked. Keeping everything comes last (it always holds); plans that do
    worse than it in the search, or are predicted to as back-offs, are not checked.

    If none of `limit` checks is sure enough (or `max_seconds` have passed before one
    is), the surest of those whose reading meets the budget is returned (the budget is
    the demand, the objective comes after it: Fashion-MNIST VGG, seed 0, once read 12
    plans 0.96 to 1.36 points down, 17-55 % sure, and the first that met the budget at
    all, 50 % sure at -1.00, read -1.06 on the report half), and failing that the
    closest (reported unmet).

    Returns:
        (the assignment, one record per candidate checked).
    """
    floor = demands.accuracy_floor(base_held)
    if floor is None or limit <= 0:
        return result.best, []
    if not 0.5 <= confidence < 1:
        raise TailorError(f"confidence {confidence} must be at least 0.5 and below 1")
    feasible = [
        (a, m) for a, m in result.ranked if not demands.violations(m, problem.baseline["accuracy"])
    ]
    if not feasible or not any(feasible[0][0]):
        return result.best, []  # nothing met the budgets, or the baseline itself is best
    budget_points = 100 * (base_held - floor)
    z = NormalDist().inv_cdf(confidence)
    held_n = len(base_samples) if base_samples is not None else 0

    def fresh(se: float) -> float:
        return prediction_error(se, held_n, test_samples)

    checks: list[dict[str, Any]] = []
    start = time.perf_counter()
    # Candidates by (tier, objective, order): the ranking's plans that do better than
    # keeping everything and back-offs as they come (tier 0), then the ranking's plans put
    # off as near-duplicates of a failure (1), then keeping everything (2).
    queue: list[tuple[int, float, int, tuple[int, ...], int, int, Mapping[str, float]]] = []
    order = itertools.count()
    keep_key = math.inf
    for rank, (a, m) in enumerate(feasible):
        key = back_off.objective(m) if back_off is not None else float(rank)
        if not any(a):  # the plans after it do worse than keeping everything
            heapq.heappush(queue, (2, key, next(order), tuple(a), rank, 0, m))
            keep_key = key
            break
        heapq.heappush(queue, (0, key, next(order), tuple(a), rank, 0, m))
    seen: set[tuple[int, ...]] = set()
    failed: list[tuple[dict[str, Any], Mapping[str, float]]] = []

    def out_of_time() -> bool:
        if checks and max_seconds is not None and time.perf_counter() - start > max_seconds:
            logger.warning(
                "confirmation: stopped after %d check(s), %.0f s (its time limit)",
                len(checks),
                time.perf_counter() - start,
            )
            return True
        return len(checks) >= limit

    def push_back_off(
        a: tuple[int, ...], m: Mapping[str, float], change: float, se: float, rank: int, depth: int
    ) -> None:
        if back_off is None or depth >= BACK_OFFS:
            return
        told = problem.baseline["accuracy"] + change - z * fresh(se)
        out = back_off(a, told, m)
        if out is None or out[0] in seen or not any(out[0]):
            return
        milder, predicted = out
        key = back_off.objective(predicted)
        if key < keep_key:  # predicted to do better than keeping everything
            heapq.heappush(queue, (0, key, next(order), milder, rank, depth + 1, predicted))

    def near_failure(a: tuple[int, ...]) -> tuple[dict[str, Any], Mapping[str, float]] | None:
        close = [
            (sum(x != y for x, y in zip(a, r["assignment"], strict=True)), k)
            for k, (r, _) in enumerate(failed)
        ]
        close = [  # at most NEAR units, and a quarter of those the failed plan changes
            (d, k)
            for d, k in close
            if d <= min(NEAR, sum(map(bool, failed[k][0]["assignment"])) // 4)
        ]
        return failed[min(close)[1]] if close else None

    while queue and not out_of_time():
        tier, key, _, a, rank, depth, m = heapq.heappop(queue)
        if a in seen:
            continue
        if not any(a):  # keeping everything always holds: stop here
            checks.append({"rank": rank, "assignment": list(a), "holds": True, "sure": True})
            return a, checks
        near = near_failure(a) if tier == 0 and not depth else None
        if near is not None:
            record, near_m = near
            guess = record["change_held_out"] + _search_accuracy(m) - _search_accuracy(near_m)
            se = record["se_held_out"]
            if budget_confidence(100 * guess, 100 * se, budget_points) < 0.5:
                logger.info(
                    "confirmation: candidate %d put off: a plan %d unit(s) from it read "
                    "%+.2f points on held-out data (this one: %+.2f predicted); its back-off "
                    "first",
                    rank + 1,
                    sum(x != y for x, y in zip(a, record["assignment"], strict=True)),
                    100 * record["change_held_out"],
                    100 * guess,
                )
                push_back_off(a, m, guess, se, rank, depth)
                heapq.heappush(queue, (1, key, next(order), a, rank, depth, m))
                continue
        seen.add(a)
        if progress is not None:
            progress("confirming on held-out data", len(checks), limit)
        try:
            held, se = _held_reading(held_eval, problem.build(a), base_samples)
        except TailorError as e:  # built in the search, so this is unexpected: skip it
            logger.warning("confirmation: candidate %s failed to build: %s", a, e)
            continue
        sure = budget_confidence(100 * (held - base_held), 100 * fresh(se), budget_points)
        record = {
            "rank": rank,
            "assignment": list(a),
            "accuracy_held_out": held,
            "change_held_out": held - base_held,
            "se_held_out": se,
            "confidence": sure,
            "holds": held >= floor - 1e-12,
            "sure": sure >= confidence,
        }
        if depth:
            record["backed_off"] = depth
        checks.append(record)
        logger.info(
            "confirmation: candidate %d of the search%s: %+.2f ± %.2f points on held-out "
            "data, keeps the budget with %.0f %% confidence",
            rank + 1,
            " backed off" if depth else "",
            100 * (held - base_held),
            100 * se,
            100 * sure,
        )
        if record["sure"]:
            return a, checks
        if not depth:  # a reading in the search to shift from
            failed.append((record, m))
        push_back_off(a, m, held - base_held, se, rank, depth)
    held_checks = [c for c in checks if "accuracy_held_out" in c]
    if not held_checks:
        return result.best, checks
    holding = [c for c in held_checks if c["holds"]]
    if holding:  # the surest (the best-ranked of equals: max keeps the first)
        pick = max(holding, key=lambda c: c["confidence"])
    else:
        pick = max(held_checks, key=lambda c: c["accuracy_held_out"])
    return tuple(pick["assignment"]), checks


def confirmation_summary(
    checks: Sequence[Mapping[str, Any]],
    chosen: Sequence[int],
    confidence: float,
    test_samples: int = 0,
) -> str:
    """One line on what the confirmation checked and why it applied what it applied
    ('' when nothing was checked); `test_samples`: the fresh test set the confidence is
    about (0: the true accuracy)."""
    read = [c for c in checks if "change_held_out" in c]
    if not read:
        return ""
    pick = next((c for c in checks if list(c["assignment"]) == list(chosen)), None)
    if pick is None or "change_held_out" not in pick:
        what = "kept the original model (the first candidate that keeps every layer)"
    else:
        what = (
            f"applied its #{pick['rank'] + 1}{' backed off' if pick.get('backed_off') else ''}: "
            f"{100 * pick['change_held_out']:+.2f} "
            f"± {100 * pick.get('se_held_out', 0.0):.2f} points, keeps the accuracy budget "
            f"with {100 * pick.get('confidence', 0.0):.0f} % confidence"
            + (f" on a fresh test set of {test_samples:,} samples" if test_samples else "")
        )
        if not pick.get("sure", pick["holds"]):
            what += f" (none checked reached {100 * confidence:.0f} %; this is the " + (
                "surest whose reading meets the budget)" if pick["holds"] else "closest one)"
            )
    return (
        f"confirmation: checked {len(read)} plan(s) on held-out data (the search's best by "
        f"objective, with back-offs of those not sure enough); {what}"
    )


def _scores_samples(evaluator: Evaluator) -> bool:
    """Whether the evaluator gives per-sample scores (so paired errors can be used)."""
    return type(evaluator).per_sample is not Evaluator.per_sample


def compress(
    source: str | os.PathLike | bytes | Model,
    *,
    calibration: Mapping[str, np.ndarray] | str | os.PathLike,
    target: str = "host",
    demands: Demands | None = None,
    labels: tuple[np.ndarray, np.ndarray] | str | os.PathLike | None = None,
    evaluator: Evaluator | str | None = None,
    strategy: str = "greedy",
    seed: int = 0,
    max_evaluations: int | None = None,
    max_seconds: float | None = None,
    output_dir: str | os.PathLike | None = None,
    space: SpaceConfig | None = None,
    latency_source: str = "auto",
    resume: bool = True,
    workers: int = 1,
    rpc: str | None = None,
    key: str | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
    confirm: int = CONFIRM,
    confidence: float = CONFIDENCE,
    test_samples: int | None = None,
) -> CompressResult:
    """Searches a per-layer plan for `source` on `target` under `demands`, applies it, and
    (with `output_dir`) writes `model.onnx`, `plan.yaml` and `report.md` with its plots.

    Args:
        source: the model (path, bytes or Model).
        calibration: input arrays for the data-driven passes (or a `.npz` path).
        target: a target name or YAML file (`tailor targets`).
        demands: budgets and weights (default: 1 point of accuracy, latency and storage).
        labels: held-out inputs and labels (arrays or `FILE.npz[:X,Y]`): accuracy is
            searched on half and verified on the other half. Without labels (and without
            `evaluator`) the score is fidelity to the original model.
        evaluator: a user's evaluator (or `module:function`), used for search and result.
        strategy: `greedy`, `evolutionary` or `rl`.
        seed: makes the search and every pass reproducible.
        max_evaluations, max_seconds: the search budget (with `max_seconds`, the
            confirmation starts no new check after a quarter of it, or a minute).
        output_dir: where to write the results (created); None: write nothing.
        space: the options offered per layer.
        latency_source: `auto`, `measured`, `learned` or `roofline` (see `tailor cost`).
        resume: continue a killed search from `output_dir`'s state file.
        workers: processes that build candidates in parallel (scoring and timing stay
            in this process, one candidate at a time).
        rpc, key: a TVM RPC tracker `HOST:PORT` and device key: every candidate's latency
            is then measured on those boards (a TVM module compiled for `target`).
        progress: `(message, done, total)` callback.
        confirm: how many of the search's best candidates may be checked on the
            held-out part before one is chosen (0: take the search's best as it is);
            see :func:`_confirm`.
        confidence: how sure the confirmation must be that the applied plan keeps the
            accuracy budget, judged from its held-out reading and that reading's paired
            standard error (0.5: the reading itself must meet the budget); see
            :func:`_confirm`.
        test_samples: the confidence is that a fresh test set of this many samples reads
            the plan within the budget (:func:`prediction_error`); None: as many as the
            labelled samples given (both parts); 0: about the plan's true accuracy.
    """
    from tailor.api import apply_plan, load, load_calibration, run_pipeline
    from tailor.costing import cost_function
    from tailor.evaluate import load_labels, load_user_evaluator
    from tailor.report import write_report
    from tailor.targets import get_target

    demands = demands or Demands()
    if not 0.5 <= confidence < 1:
        raise TailorError(f"confidence {confidence} must be at least 0.5 and below 1")
    if test_samples is not None and test_samples < 0:
        raise TailorError(f"test samples {test_samples} must be 0 or more")
    target_obj = get_target(target)
    original = load(source)
    model_bytes = (
        original.to_bytes()
        if not isinstance(source, (str, os.PathLike, bytes))
        else (Path(source).read_bytes() if not isinstance(source, bytes) else source)
    )
    if not isinstance(calibration, Mapping):
        calibration = load_calibration(calibration, original)
    if isinstance(labels, (str, os.PathLike)):
        labels = load_labels(labels)
    if isinstance(evaluator, str):
        evaluator = load_user_evaluator(evaluator)
    out_dir = Path(output_dir) if output_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    fused = run_pipeline(original, "fuse", check="basic").model
    search_eval, held_eval, pass_data, eval_note = _evaluators(
        fused, calibration, labels, evaluator, seed
    )
    if bool(rpc) != bool(key):
        raise TailorError("rpc (HOST:PORT) and key (the devices' name) go together")
    costs = cost_function(target_obj, latency_source=latency_source, rpc=rpc, key=key)
    units = build_space(fused, space)
    if not units:
        raise TailorError(
            "the model has no layer tailor can compress (no Conv, Gemm or MatMul with constant weights)"
        )
    problem = ModelProblem(
        fused,
        units,
        calibration=pass_data,
        evaluator=search_eval,
        costs=costs,
        seed=seed,
        workers=workers,
    )
    if _scores_samples(search_eval):
        eval_note += (
            "; the search credits each candidate with its accuracy less one paired standard "
            "error of its change from the baseline"
        )
    if out_dir is not None and resume:
        key = _search_key(
            model_bytes, target_obj.name, demands, units, f"{strategy}/{seed}/{eval_note}"
        )
        wrapped = CachedProblem(problem, out_dir / "search-state.jsonl", key=key)
    else:
        wrapped = problem
    start = time.perf_counter()
    try:
        with _terminate_raises():
            result = search(
                wrapped,
                demands,
                strategy,
                seed=seed,
                budget=Budget(max_evaluations=max_evaluations, max_seconds=max_seconds),
                progress=progress,
                workers=workers,
            )
    except BaseException:
        problem.close(wait=False)  # stopped (Ctrl-C, kill): end the workers now
        raise
    problem.close()
    base_samples = held_eval.per_sample(fused) if _scores_samples(held_eval) else None
    base_held = float(base_samples.mean()) if base_samples is not None else float(held_eval(fused))
    if test_samples is None and base_samples is not None:  # as many as the labelled samples
        test_samples = len(base_samples) + len(getattr(search_eval, "x", base_samples))
    if held_eval is not search_eval:
        chosen, checks = _confirm(
            problem,
            result,
            held_eval,
            demands,
            base_held,
            limit=confirm,
            confidence=confidence,
            base_samples=base_samples,
            test_samples=test_samples,
            max_seconds=None if max_seconds is None else max(60.0, CONFIRM_SHARE * max_seconds),
            back_off=BackOff(problem, demands, result.history),
            progress=progress,
        )
    else:  # a user's evaluator: no data of its own to confirm on
        chosen, checks = result.best, []
    ranked = dict(result.ranked)
    if chosen not in ranked:  # a plan the confirmation backed off: the search never saw it
        (seen,) = problem.evaluate([chosen])
        ranked[chosen] = seen.metrics or result.metrics
    chosen_metrics = dict(ranked.get(chosen, result.metrics))
    unmet_in_search = demands.violations(chosen_metrics, problem.baseline["accuracy"])
    layers_plan = assignment_layers(fused, units, chosen)
    plan = Plan(
        layers=layers_plan,
        target=target_obj.name,
        model_sha256=model_digest(model_bytes),
        model_name=Path(source).name if isinstance(source, (str, os.PathLike)) else "",
        demands=demands.as_dict(),
        strategy=strategy,
        seed=seed,
    )
    applied = apply_plan(model_bytes, plan, calibration=pass_data, check="full")
    final = applied.model
    baseline = dict(problem.baseline)
    baseline["accuracy_held_out"] = base_held
    measured = problem.measure(final)
    held, held_se = _held_reading(held_eval, final, base_samples)
    measured["accuracy_held_out"] = held
    if base_samples is not None:
        measured["accuracy_held_out_se"] = held_se
    check = dict(measured, accuracy=measured["accuracy_held_out"])
    plan.unmet = demands.violations(check, baseline["accuracy_held_out"])
    plan.metrics = {
        "evaluation": eval_note,
        "sources": costs.sources if hasattr(costs, "sources") else {},
        "baseline": baseline,
        "predicted": chosen_metrics,
        "result": measured,
        "search": {
            "strategy": strategy,
            "evaluations": result.evaluations,
            "seconds": round(time.perf_counter() - start, 2),
            "feasible_in_search": not unmet_in_search,
            "unmet_in_search": unmet_in_search,
            "confirmation": checks,
            "confidence": confidence,
            "test_samples": test_samples or 0,
        },
    }
    out = CompressResult(plan, final, result, baseline, measured, chosen=chosen)
    if out_dir is not None:
        final.save(out_dir / "model.onnx")
        out.files["model"] = out_dir / "model.onnx"
        out.files["plan"] = plan.save(out_dir / "plan.yaml")
        out.files.update(write_report(out, units, out_dir))
    return out
