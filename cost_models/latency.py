"""Latency cost model: per-kernel and whole-model latency of a model on a target, every
number labelled with where it came from.

Sources (DESIGN.md's cost-model contract):

- `measured`: timed on this machine. With onnxruntime (CPU, batch 1, fixed intra-op
  threads), the whole model is the 10th percentile of many runs after a warm-up (the
  median, in the note, varies with what else runs on a shared machine) and each kernel
  comes from onnxruntime's profiler (:mod:`.latency_measure`); with TVM, the module
  built for the target (tuned where the database has schedules) is timed by
  `time_evaluator`, locally or on a device behind an RPC tracker (whole model only).
- `tvm-tuned`: the best times of the model's tasks in the target's MetaSchedule
  database (:func:`tailor.targets.tune.tuned_tasks`), summed; an error names the tasks
  the database lacks.
- `learned`: the target's :class:`~.latency_predictor.LatencyPredictor`, trained on its
  own kernel measurements.
- `roofline`: per kernel `max(2 MACs / peak, bytes / bandwidth)` plus a fixed call
  overhead, from the target's figures: for a device never measured.

Kernels are what runs fused (:func:`~.latency_kernels.kernels`), so a Conv with its
BatchNormalization and Relu is one latency, not three.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import onnx

from tailor.cost_models.base import Estimate, LayerCost
from tailor.cost_models.latency_features import FEATURE_NAMES, features
from tailor.cost_models.latency_kernels import Kernel, kernels
from tailor.cost_models.latency_measure import corrected, profile_model, time_model
from tailor.cost_models.latency_predictor import (
    LatencyPredictor,
    LatencySample,
    PredictedLatency,
    predictor_path,
)
from tailor.errors import TailorError, TargetError
from tailor.ir.model import Model
from tailor.targets.target import Target, get_target

__all__ = [
    "LatencySource",
    "MissingTuningError",
    "ROOFLINE_KERNEL_OVERHEAD_US",
    "Kernel",
    "FEATURE_NAMES",
    "LatencyPredictor",
    "LatencySample",
    "PredictedLatency",
    "kernels",
    "features",
    "predictor_path",
    "estimate_latency",
    "measure_sample",
    "roofline_latency",
]

logger = logging.getLogger(__name__)

LatencySource = Literal["auto", "measured", "tvm-tuned", "learned", "roofline"]
ModelSource = Model | str | os.PathLike | bytes | onnx.ModelProto

#: Fixed cost of one kernel call in microseconds, by device type: about what onnxruntime
#: spends on a tiny node on the development machine (1.0-1.1 us per Relu of 16 floats),
#: and a typical GPU kernel launch.
ROOFLINE_KERNEL_OVERHEAD_US = {"cpu": 1.0, "gpu": 5.0}

_KEY = "latency_ms"


class MissingTuningError(TailorError):
    """The tuning database lacks tasks of the model (their names are in the message)."""


def _model(source: ModelSource) -> Model:
    return source if isinstance(source, Model) else Model.load(source)


def _layers(found: Sequence[Kernel], values_ms: Sequence[float], source: str) -> list[LayerCost]:
    return [
        LayerCost(k.name, k.op, list(k.nodes), {_KEY: Estimate(float(v), "ms", source)})
        for k, v in zip(found, values_ms, strict=True)
    ]


def _runs_here(target: Target) -> bool:
    return target.device_type == "cpu" and target.is_native


# ---------------------------------------------------------------------------- roofline
def roofline_latency(
    found: Sequence[Kernel], target: Target, *, threads: int | None = None
) -> list[float]:
    """Each kernel's roofline time in milliseconds on `target`.

    CPU peaks are for all cores; with `threads` fewer than the target's cores, the peak
    shrinks in proportion (bandwidth does not).
    """
    overhead_us = ROOFLINE_KERNEL_OVERHEAD_US[target.device_type]
    share = 1.0
    if target.device_type == "cpu" and threads:
        share = min(threads, target.cores) / target.cores
    out = []
    for k in found:
        ops = 2.0 * k.macs if k.kind in ("conv", "gemm") else float(k.macs)
        compute_s = ops / (target.peak(k.dtype) * 1e9 * share)
        memory_s = (k.weight_bytes + k.activation_bytes) / (target.mem_bandwidth_gbs * 1e9)
        out.append(max(compute_s, memory_s) * 1e3 + overhead_us / 1e3)
    return out


def _roofline(
    model: Model, target: Target, threads: int | None
) -> tuple[list[LayerCost], Estimate]:
    found = kernels(model)
    values = roofline_latency(found, target, threads=threads)
    note = (
        f"peak {target.peak('float32'):g} GFLOP/s float32, {target.mem_bandwidth_gbs:g} GB/s, "
        f"{ROOFLINE_KERNEL_OVERHEAD_US[target.device_type]:g} us per kernel; "
        "assumes peak efficiency"
    )
    return _layers(found, values, "roofline"), Estimate(sum(values), "ms", "roofline", note)


# ---------------------------------------------------------------------------- learned
def _predictor(
    target: Target,
    predictor: LatencyPredictor | str | os.PathLike | None,
    threads: int,
    cache_dir: str | os.PathLike | None,
) -> LatencyPredictor | None:
    if isinstance(predictor, LatencyPredictor):
        return predictor
    if predictor is not None:
        return LatencyPredictor.load(predictor)
    path = predictor_path(target, threads=threads, cache_dir=_sub(cache_dir, "latency"))
    if not path.is_file():
        return None
    try:
        return LatencyPredictor.load(path)
    except TailorError as e:
        # A cached predictor from another tailor (its features changed) is not the
        # user's doing: it is set aside, as if absent, and said so.
        logger.warning("ignoring the cached latency predictor: %s", e)
        return None


def _learned(
    model: Model, target: Target, predictor: LatencyPredictor
) -> tuple[list[LayerCost], Estimate]:
    if not _runs_here(target):
        # The features include what this machine's onnxruntime makes of each kernel.
        logger.warning(
            "the learned latency model reads kernels as this machine's onnxruntime runs them; "
            "for %s (%s) that is an approximation",
            target.name,
            target.arch,
        )
    (result,) = predictor.predict([model])
    meta = predictor.meta
    note = (
        f"{len(result.kernels)} kernels x {predictor.scale:.3f} + {result.overhead_ms:.4f} ms "
        f"per run; trained on {meta.get('samples', '?')} measured models"
        + (f" ({meta['source']})" if meta.get("source") else "")
    )
    return _layers(result.kernels, result.kernel_ms, "learned"), Estimate(
        result.total_ms, "ms", "learned", note
    )


# ---------------------------------------------------------------------------- tvm-tuned
def _tvm_tuned(
    model: Model, target: Target, cache_dir: str | os.PathLike | None
) -> tuple[list[LayerCost], Estimate]:
    from tailor.targets.tune import database_dir, tuned_tasks

    tune_dir = _sub(cache_dir, "tune")
    tasks = tuned_tasks(model, target, cache_dir=tune_dir)
    missing = [t.name for t in tasks if t.best_us is None]
    if missing:
        raise MissingTuningError(
            f"the tuning database {database_dir(target, tune_dir)} lacks {len(missing)} of the "
            f"model's {len(tasks)} tasks ({', '.join(missing)}); tune the model for "
            f"{target.name!r} first (`tailor tune`)"
        )
    layers = [
        LayerCost(
            t.name,
            "tvm-task",
            [],
            {
                _KEY: Estimate(
                    t.weight * (t.best_us or 0.0) / 1e3, "ms", "tvm-tuned", f"x{t.weight}"
                )
            },
        )
        for t in tasks
    ]
    total = sum(layer.metrics[_KEY].value for layer in layers)
    note = "sum of tuned task times; operators TVM runs outside tasks (reshapes) not counted"
    return layers, Estimate(total, "ms", "tvm-tuned", note)


# ---------------------------------------------------------------------------- measured
def _measured_ort(model: Model, threads: int, runs: int) -> tuple[list[LayerCost], Estimate]:
    import onnxruntime as ort

    timing = time_model(model, threads=threads, runs=runs)
    profile = profile_model(model, threads=threads)
    per_kernel_us = corrected(profile, timing.p10_ms * 1e3)
    note = (
        f"onnxruntime {ort.__version__} CPU, {threads} thread(s), batch 1: 10th percentile of "
        f"{timing.runs} runs (median {timing.median_ms:.4f} ms, IQR {timing.q1_ms:.4f}-"
        f"{timing.q3_ms:.4f} ms; the low percentile leaves out runs other processes slowed)"
    )
    layers = [
        LayerCost(
            k.name,
            k.op,
            list(k.nodes),
            {_KEY: Estimate(us / 1e3, "ms", "measured", "onnxruntime profiler, own cost removed")},
        )
        for k, us in zip(profile.kernels, per_kernel_us, strict=True)
    ]
    return layers, Estimate(timing.p10_ms, "ms", "measured", note)


def _measured_tvm(
    model: Model,
    target: Target,
    cache_dir: str | os.PathLike | None,
    rpc: str | None,
    key: str | None,
    runs: int,
) -> tuple[list[LayerCost], Estimate]:
    from tailor.targets.tune import build_tuned
    from tailor.targets.tvm_build import make_inputs, time_local

    built = build_tuned(model, target, cache_dir=_sub(cache_dir, "tune"))
    number, repeat = max(1, runs // 10), 10
    if rpc:
        from tailor.targets.rpc import connect

        if not key:
            raise TailorError("measuring through an RPC tracker needs the device key")
        with connect(rpc, key, target=target) as device:
            timing = device.time(built, make_inputs(built.inputs), number=number, repeat=repeat)
        where = f"device {key!r} via {rpc}"
    else:
        timing = time_local(built, number=number, repeat=repeat)
        where = "this machine"
    schedules = "tuned schedules" if built.tuned else "TVM's default schedules"
    note = f"TVM module ({schedules}) on {where}, median of {repeat} x {number} runs"
    return [], Estimate(timing.median_s * 1e3, "ms", "measured", note)


# ---------------------------------------------------------------------------- entry point
def _sub(cache_dir: str | os.PathLike | None, name: str) -> Path | None:
    return None if cache_dir is None else Path(cache_dir).expanduser() / name


def estimate_latency(
    model: ModelSource,
    target: Target | str = "host",
    *,
    source: LatencySource = "auto",
    measure: bool = False,
    runtime: Literal["onnxruntime", "tvm"] = "onnxruntime",
    predictor: LatencyPredictor | str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    runs: int = 100,
    rpc: str | None = None,
    key: str | None = None,
) -> tuple[list[LayerCost], Estimate]:
    """Per-kernel and whole-model latency of `model` on `target`.

    Args:
        model: the model (batch 1; symbolic batch dimensions become 1).
        target: a target or its name.
        source: where the numbers come from; `auto` picks `measured` when `measure` is
            set and the target can be measured (this machine's CPU, or `rpc`), else
            `learned` when a predictor is given or cached for the target, else
            `roofline`. `tvm-tuned` is only used when asked for.
        measure: allow `auto` to measure (it takes seconds).
        runtime: what `measured` times: onnxruntime on this machine (per kernel and
            whole model) or the TVM module for the target (whole model only).
        predictor: a trained predictor or its JSON file (default: the cached one, see
            :func:`~.latency_predictor.predictor_path`).
        cache_dir: root of tailor's caches: predictors in `<cache_dir>/latency`, tuning
            databases in `<cache_dir>/tune` (default `~/.cache/tailor`).
        threads: onnxruntime intra-op threads, measured or predicted (default 1).
        runs: timed runs for `measured`.
        rpc, key: TVM RPC tracker `HOST:PORT` and device key for `runtime="tvm"`.

    Returns:
        One :class:`LayerCost` per kernel (per TVM task for `tvm-tuned`; none for a TVM
        measurement) whose `metrics["latency_ms"]` is an :class:`Estimate`, and the
        whole-model :class:`Estimate` in milliseconds. All carry the same source.

    Raises:
        TargetError: `measured` on a target this machine cannot run.
        MissingTuningError: `tvm-tuned` and the database lacks some of the model's tasks.
        TailorError: `learned` and no predictor is given or cached for the target.
    """
    target = get_target(target)
    threads = threads or 1
    loaded = _model(model)
    measurable = _runs_here(target) or (runtime == "tvm" and rpc is not None)
    if source == "auto":
        found = None if predictor is not None else _predictor(target, None, threads, cache_dir)
        if measure and measurable:
            source = "measured"
        elif predictor is not None or found is not None:
            source, predictor = "learned", predictor or found
        else:
            source = "roofline"
    logger.debug("latency of %s on %s from %s", loaded.source, target.name, source)
    if source == "roofline":
        return _roofline(loaded, target, threads)
    if source == "learned":
        chosen = _predictor(target, predictor, threads, cache_dir)
        if chosen is None:
            raise TailorError(
                f"no latency predictor for target {target.name!r} with {threads} thread(s) in "
                f"{predictor_path(target, threads=threads, cache_dir=_sub(cache_dir, 'latency'))}; "
                "train one (python -m benchmarks.cost_model) or pass predictor="
            )
        return _learned(loaded, target, chosen)
    if source == "tvm-tuned":
        return _tvm_tuned(loaded, target, cache_dir)
    if source == "measured":
        if runtime == "tvm":
            if not measurable:
                raise TargetError(
                    f"target {target.name!r} cannot run on this machine; give an RPC tracker and "
                    "device key to measure it"
                )
            return _measured_tvm(loaded, target, cache_dir, rpc, key, runs)
        if not measurable:
            raise TargetError(
                f"onnxruntime measures this machine's CPU, not target {target.name!r} "
                f"({target.kind}, {target.arch}); use runtime='tvm' with an RPC tracker"
            )
        return _measured_ort(loaded, threads, runs)
    raise TailorError(
        f"unknown latency source {source!r}; choose auto, measured, tvm-tuned, learned or roofline"
    )


def measure_sample(
    model: ModelSource, *, name: str = "", threads: int = 1, runs: int = 100
) -> LatencySample:
    """Measures a model on this machine with onnxruntime: a training sample for
    :meth:`LatencyPredictor.fit` (whole model: the 10th percentile of `runs` runs)."""
    loaded = _model(model)
    timing = time_model(loaded, threads=threads, runs=runs)
    profile = profile_model(loaded, threads=threads)
    return LatencySample(
        name or loaded.source,
        profile.kernels,
        corrected(profile, timing.p10_ms * 1e3),
        timing.p10_ms,
    )
