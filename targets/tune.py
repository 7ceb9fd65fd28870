"""MetaSchedule tuning of a model's tasks for a target: replaces one-shot `tune_relax` runs
with a resumable, per-task budgeted loop over a JSON database in a cache directory.

- Tasks are the model's fused operators (TVM's extraction); each gets `trials` measured
  candidates, and the database is keyed by the task's structure, so a layer tuned for one
  model is reused by every model that contains it.
- Records are appended to the database after every batch: killing the process loses at
  most the batch in flight. A second run measures only what the budget still lacks.
- Ctrl-C lets the batch in flight finish, keeps it, and stops (:class:`TuneInterrupted`);
  a second Ctrl-C stops at once.
- Measurement is local (the host) or on devices behind a TVM RPC tracker.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from tailor.errors import TailorError, TargetError
from tailor.ir.model import Model
from tailor.targets.rpc import DEFAULT_TIMEOUT, TrackerAddress, check_key, parse_tracker
from tailor.targets.target import Target, get_target
from tailor.targets.tvm_build import BuiltModule, build, import_onnx

__all__ = [
    "TaskResult",
    "TuneResult",
    "TuneProgress",
    "TuneInterrupted",
    "default_cache_dir",
    "database_dir",
    "open_database",
    "extract_tasks",
    "tune",
    "tuned_tasks",
    "build_tuned",
]

logger = logging.getLogger(__name__)

#: Per-task budgets that finished (the search may stop short of a budget when a task's
#: space has fewer candidates); kept beside MetaSchedule's own two files.
_STATE_FILE = "tailor_tasks.json"

#: Trials per task from which the search is guided by MetaSchedule's XGBoost cost model.
_XGB_MIN_TRIALS = 32


@dataclass
class TaskResult:
    """One tuning task (a fused operator) and what the database knows about it.

    Attributes:
        name: TVM's task name (`fused_conv2d_add_relu`).
        key: the task's structural hash: its key in the database.
        weight: how many times the model runs it.
        flops: floating-point operations per call (TVM's estimate).
        trials_before: candidates measured before this run.
        trials: candidates measured in all, after this run.
        best_us: the fastest measured latency, in microseconds (None: no successful run).
        error: the last error of a failed candidate in this run, if any.
    """

    name: str
    key: str
    weight: int
    flops: float
    trials_before: int = 0
    trials: int = 0
    best_us: float | None = None
    error: str | None = None

    @property
    def measured(self) -> int:
        """Candidates measured in this run."""
        return self.trials - self.trials_before


@dataclass
class TuneResult:
    """What a :func:`tune` call did."""

    target: Target
    database_dir: Path
    tasks: list[TaskResult]
    trials: int
    interrupted: bool = False

    @property
    def measured(self) -> int:
        """Candidates measured in this run (0 when the database already had everything)."""
        return sum(t.measured for t in self.tasks)

    @property
    def latency_us(self) -> float | None:
        """Sum over tasks of weight x best latency; None while a task has no measurement.

        Operators that are not tuning tasks (reshapes the VM does itself) are not in it.
        """
        if any(t.best_us is None for t in self.tasks):
            return None
        return sum(t.weight * (t.best_us or 0.0) for t in self.tasks)


@dataclass(frozen=True)
class TuneProgress:
    """Reported after every measured batch."""

    task: TaskResult
    task_index: int
    task_count: int
    budget: int
    measured: int
    planned: int


class TuneInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped tuning; everything measured so far is in the database.

    A KeyboardInterrupt, so a script that does not catch it stops as usual.
    """

    def __init__(self, result: TuneResult):
        super().__init__(f"tuning interrupted; {result.measured} new measurement(s) kept")
        self.result = result


def default_cache_dir() -> Path:
    """`$TAILOR_CACHE_DIR/tune`, else `$XDG_CACHE_HOME/tailor/tune`, else
    `~/.cache/tailor/tune`."""
    if os.environ.get("TAILOR_CACHE_DIR"):
        return Path(os.environ["TAILOR_CACHE_DIR"]).expanduser() / "tune"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tailor" / "tune"


def database_dir(target: Target | str, cache_dir: str | os.PathLike | None = None) -> Path:
    """`<cache_dir>/<target name>/<fingerprint of its TVM target>`: editing a target's TVM
    definition starts a new database instead of mixing records of two definitions."""
    target = get_target(target)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / target.name / target.fingerprint()


def _repair_jsonl(path: Path) -> None:
    """Drops a last line cut short by a kill, which MetaSchedule could not load."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = len(data.rstrip())
    start = data.rfind(b"\n", 0, end) + 1  # where the last non-empty line begins
    try:
        json.loads(data[start:end] or b"null")
        return
    except ValueError:
        pass
    logger.warning("dropping an incomplete last record of %s (the run was killed mid-write)", path)
    with open(path, "r+b") as f:
        f.truncate(start)


def open_database(
    target: Target | str, cache_dir: str | os.PathLike | None = None, *, create: bool = True
) -> Any:
    """The target's MetaSchedule JSON database (repaired after a kill).

    Returns None when it does not exist and `create` is False.
    """
    from tvm.s_tir import meta_schedule as ms

    target = get_target(target)
    folder = database_dir(target, cache_dir)
    if not create and not (folder / "database_workload.json").exists():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / "target.json"
    if not info.exists():
        info.write_text(json.dumps(target.to_dict(), indent=2) + "\n")
    for name in ("database_workload.json", "database_tuning_record.json"):
        _repair_jsonl(folder / name)
    return ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One tuning process per database: two would interleave workload indices."""
    with open(folder / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise TailorError(
                    f"the tuning database {folder} is in use by another `tailor tune`; wait for "
                    "it or give another --cache-dir"
                ) from e
            raise
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fuse(mod: Any, tvm_target: Any) -> Any:
    """The preparation MetaSchedule's `compile_relax` applies before looking up schedules,
    so extracted tasks are keyed exactly as the tuned build will look them up."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline

    try:
        dispatch = list(pipeline.library_dispatch_passes(tvm_target))
    except (ValueError, AttributeError):
        dispatch = []
    passes = [
        *dispatch,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    with tvm_target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)


def extract_tasks(
    model: Model | str | os.PathLike | bytes | onnx.ModelProto,
    target: Target | str,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
) -> list[Any]:
    """The model's tuning tasks for the target (MetaSchedule `ExtractedTask`s)."""
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks as ms_extract

    target = get_target(target)
    model = model if isinstance(model, Model) else Model.load(model)
    tvm_target = target.tvm()
    mod, _ = import_onnx(model, input_shapes=input_shapes, batch=batch)
    return list(ms_extract(_fuse(mod, tvm_target), tvm_target))


def _seconds(record: Any) -> float | None:
    values = [float(getattr(v, "value", v)) for v in (record.run_secs or [])]
    return sum(values) / len(values) if values and max(values) < 1e9 else None


def _task_results(database: Any, tasks: Sequence[Any]) -> list[TaskResult]:
    """Each task's key, and how many trials and which best latency the database holds."""
    import tvm_ffi
    from tvm.s_tir.analysis import estimate_tir_flops

    records = database.get_all_tuning_records()
    results = []
    for task in tasks:
        mod = task.dispatched[0]
        result = TaskResult(
            name=str(task.task_name),
            key=str(tvm_ffi.structural_hash(mod)),
            weight=int(task.weight),
            flops=float(estimate_tir_flops(mod)),
        )
        if database.has_workload(mod):
            workload = database.commit_workload(mod)  # the stored one; writes nothing new
            result.trials = sum(1 for r in records if r.workload.same_as(workload))
            top = database.get_top_k(workload, 1)
            result.best_us = _seconds(top[0]) * 1e6 if top and _seconds(top[0]) else None
        result.trials_before = result.trials
        results.append(result)
    return results


def _load_state(folder: Path) -> dict[str, dict[str, Any]]:
    try:
        state = json.loads((folder / _STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _save_state(folder: Path, state: Mapping[str, Any]) -> None:
    tmp = folder / f".{_STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / _STATE_FILE)


class _StopRequested(Exception):
    """Raised from the measure callback to end MetaSchedule's loop after a Ctrl-C."""


@contextlib.contextmanager
def _graceful_sigint(stop: threading.Event) -> Iterator[None]:
    """First Ctrl-C sets `stop` (the batch in flight finishes); the second interrupts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        logger.warning("stopping after the batch in flight (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _measure_callback(
    results: list[TaskResult],
    index_of: list[int],
    budget: int,
    planned: int,
    stop: threading.Event,
    progress: Callable[[TuneProgress], None] | None,
    counter: dict[str, int],
) -> Any:
    """A MetaSchedule measure callback that tracks trials and best latency per task,
    reports progress, and ends the loop when a stop was requested."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(
            self, task_scheduler, task_id, measure_candidates, builder_results, runner_results
        ):
            if not measure_candidates:  # a task whose search has nothing left to try
                if stop.is_set():
                    raise _StopRequested
                return
            result = results[index_of[task_id]]
            result.trials += len(measure_candidates)
            counter["measured"] += len(measure_candidates)
            for built, ran in zip(builder_results, runner_results, strict=False):
                error = built.error_msg or ran.error_msg
                if error:
                    result.error = str(error).strip().splitlines()[0][:300]
                    continue
                secs = [float(getattr(v, "value", v)) for v in (ran.run_secs or [])]
                if secs:
                    us = sum(secs) / len(secs) * 1e6
                    result.best_us = us if result.best_us is None else min(result.best_us, us)
            if progress is not None:
                progress(
                    TuneProgress(
                        result,
                        index_of[task_id],
                        len(results),
                        budget,
                        counter["measured"],
                        planned,
                    )
                )
            if stop.is_set():
                # Runs after AddToDatabase (callbacks run in order): this batch is saved.
                raise _StopRequested

    return _Progress()


def _physical_cores() -> int:
    from tailor.targets.builtin import _physical_cores as cores

    return cores()


def _tune_groups(
    tasks: Sequence[Any],
    remaining: Mapping[int, list[int]],
    outcome: TuneResult,
    state: dict[str, dict[str, Any]],
    *,
    planned: int,
    per_batch: int,
    threads: int,
    seed: int | None,
    builder: Any,
    runner: Any,
    database: Any,
    progress: Callable[[TuneProgress], None] | None,
) -> None:
    """Runs MetaSchedule over each group of tasks that lack the same number of trials;
    sets `outcome.interrupted` after a Ctrl-C and records finished budgets in `state`."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

    from tailor.targets import _tvm

    trials = outcome.trials
    folder = outcome.database_dir
    results = outcome.tasks
    population = min(512, max(64, 16 * trials))
    # With a few trials per task, XGBoost has nothing to learn from (and importing and
    # training it cost more than the measurements): the search then samples at random.
    cost_model = ms.cost_model.CostModel.create(
        "xgb" if trials >= _XGB_MIN_TRIALS else "random", num_tuning_cores=threads
    )
    stop = threading.Event()
    counter = {"measured": 0}  # across groups, for the progress display
    with _graceful_sigint(stop):
        for budget, indices in sorted(remaining.items()):
            # MetaSchedule's logging setup (per call) resets its level to DEBUG.
            _tvm.quiet_tvm(logger.isEnabledFor(logging.DEBUG))
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=population,
                init_min_unmeasured=min(50, population),
                genetic_num_iters=4 if trials >= 64 else 2,
            )
            contexts, weights = extracted_tasks_to_tune_contexts(
                [tasks[i] for i in indices],
                work_dir=str(folder),
                strategy=strategy,
                num_threads=threads,
                seed=seed,
            )
            callback = _measure_callback(results, indices, trials, planned, stop, progress, counter)
            try:
                ms.tune.tune_tasks(
                    tasks=contexts,
                    task_weights=weights,
                    work_dir=str(folder),
                    max_trials_global=budget * len(indices),
                    max_trials_per_task=budget,
                    num_trials_per_iter=min(per_batch, budget),
                    builder=builder,
                    runner=runner,
                    database=database,
                    cost_model=cost_model,
                    measure_callbacks=[
                        *ms.measure_callback.MeasureCallback.create("default"),
                        callback,
                    ],
                    task_scheduler="round-robin",
                )
            except Exception:
                # The stop request surfaces as whatever TVM makes of the callback's error.
                if not stop.is_set():
                    raise
            if stop.is_set():
                outcome.interrupted = True
                return
            for i in indices:
                state[results[i].key] = {"name": results[i].name, "budget": trials}
            _save_state(folder, state)


def tune(
    model: Model | str | os.PathLike | bytes | onnx.ModelProto,
    target: Target | str,
    *,
    trials: int = 64,
    rpc: str | TrackerAddress | None = None,
    key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
    trials_per_batch: int | None = None,
    threads: int | None = None,
    seed: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[TuneProgress], None] | None = None,
) -> TuneResult:
    """Tunes every task of `model` for `target` with MetaSchedule, up to `trials` measured
    candidates per task, resuming from the database in `cache_dir`.

    Args:
        trials: measured candidates per task (a task already at the budget is skipped);
            from 32 on, an XGBoost cost model guides the search, below it the candidates
            are sampled at random from the evolved population.
        rpc, key: measure on the devices with `key` behind the tracker at `rpc`
            (`HOST:PORT`); without them, on this machine (CPU targets of its architecture).
        cache_dir: root of the tuning databases (default :func:`default_cache_dir`).
        trials_per_batch: candidates measured and saved together (default: a quarter of
            `trials`, 2 to 32); smaller batches lose less to a kill.
        threads: this machine's threads for the search and the builder (default: its
            physical cores).
        seed: the search's random seed (None: random).
        timeout: seconds to wait for the tracker and the devices.
        progress: called after every batch.

    Raises:
        TargetError: the target cannot be measured here and no RPC tracker was given.
        RPCError: the tracker cannot be reached or has no device with `key`.
        TuneInterrupted: Ctrl-C; its `result` says what was kept.
    """
    if trials < 1:
        raise TailorError(f"trials must be at least 1, not {trials}")
    target = get_target(target)
    address = parse_tracker(rpc) if rpc else None
    if address is not None and not key:
        raise TailorError("measuring through an RPC tracker needs the device key (--key NAME)")
    if address is None and (target.is_gpu or not target.is_native):
        raise TargetError(
            f"target {target.name!r} ({target.kind}, {target.arch}) cannot be measured on this "
            "machine; give a TVM RPC tracker and device key (--rpc HOST:PORT --key NAME)"
        )
    servers = check_key(address, key, timeout=timeout) if address is not None else 1
    model = model if isinstance(model, Model) else Model.load(model)
    threads = threads or _physical_cores()

    from tvm.s_tir import meta_schedule as ms

    from tailor.targets import _tvm

    _tvm.register_tensor_intrinsics(target.tvm())
    tasks = extract_tasks(model, target, input_shapes=input_shapes, batch=batch)
    folder = database_dir(target, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        database = open_database(target, cache_dir)
        results = _task_results(database, tasks)
        state = _load_state(folder)
        remaining: dict[int, list[int]] = {}
        for i, r in enumerate(results):
            done = max(r.trials, int(state.get(r.key, {}).get("budget", 0)))
            if done < trials:
                remaining.setdefault(trials - r.trials, []).append(i)
        outcome = TuneResult(target, folder, results, trials)
        planned = sum(n * len(idx) for n, idx in remaining.items())
        if not remaining:
            logger.info("all %d task(s) already tuned in %s", len(tasks), folder)
            return outcome
        logger.info(
            "tuning %d of %d task(s), %d trial(s) in all, database %s",
            sum(len(v) for v in remaining.values()),
            len(tasks),
            planned,
            folder,
        )
        per_batch = trials_per_batch or min(32, max(2, math.ceil(trials / 4)))
        # Each worker process imports TVM (3-4 s of CPU): parallel ones pay off only when a
        # batch has several candidates for each.
        parallel = max(1, per_batch // 4)
        builder = _tvm.pooled_builder(
            min(threads, parallel), max(60.0, timeout), target.to_dict()["tvm_target"]
        )
        evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100)
        if address is not None:
            config = ms.runner.RPCConfig(
                tracker_host=address.host,
                tracker_port=address.port,
                tracker_key=key,
                session_timeout_sec=int(max(60, timeout)),
            )
            workers = min(servers, parallel)

            def make_runner() -> Any:
                return ms.runner.RPCRunner(
                    config,
                    evaluator_config=evaluator,
                    max_workers=workers,
                    initializer=_tvm.ignore_sigint,
                )

        else:

            def make_runner() -> Any:
                return ms.runner.LocalRunner(
                    timeout_sec=max(60.0, timeout),
                    evaluator_config=evaluator,
                    initializer=_tvm.ignore_sigint,
                )

        runner = _tvm.background_runner(make_runner)
        try:
            _tune_groups(
                tasks,
                remaining,
                outcome,
                state,
                planned=planned,
                per_batch=per_batch,
                threads=threads,
                seed=seed,
                builder=builder,
                runner=runner,
                database=database,
                progress=progress,
            )
        finally:
            _tvm.shutdown_workers(builder, runner)
    if outcome.interrupted:
        logger.warning(
            "tuning interrupted: %d new measurement(s) kept in %s; run the same command again "
            "to resume",
            outcome.measured,
            folder,
        )
        raise TuneInterrupted(outcome)
    return outcome


def tuned_tasks(
    model: Model | str | os.PathLike | bytes | onnx.ModelProto,
    target: Target | str,
    *,
    cache_dir: str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
) -> list[TaskResult]:
    """What the target's database knows about each task of `model` (trials, best latency),
    without measuring anything: the `tvm-tuned` numbers of a cost model."""
    tasks = extract_tasks(model, target, input_shapes=input_shapes, batch=batch)
    database = open_database(target, cache_dir, create=False)
    if database is None:
        from tvm.s_tir import meta_schedule as ms

        database = ms.database.MemoryDatabase()
    return _task_results(database, tasks)


def build_tuned(
    model: Model | str | os.PathLike | bytes | onnx.ModelProto,
    target: Target | str,
    *,
    cache_dir: str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
) -> BuiltModule:
    """Compiles `model` with the tuned schedules of the target's database (TVM's defaults
    for tasks it lacks); an untuned build when there is no database yet."""
    database = open_database(target, cache_dir, create=False)
    return build(model, target, input_shapes=input_shapes, batch=batch, database=database)
