"""Measures a model's latency with onnxruntime on this machine's CPU: whole-model time
(batch 1, fixed intra-op threads, warm-up then median of many runs) and, from
onnxruntime's profiler, each kernel's time (see :mod:`.latency_kernels`).

onnxruntime rewrites the graph before running it (fusions, NCHWc and NHWC layouts,
duplicated DequantizeLinear nodes), so the profiler names nodes of *its* graph. The
session writes that optimized graph too; each of its nodes is mapped back to a kernel by
name (`conv_token_12`, `x/duplicated`, `y_nchwc`), by the tensor it computes, or, for
nodes onnxruntime adds (layout reorders, transposes), by the kernel it feeds or follows.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from tailor.cost_models.latency_kernels import Kernel, kernels
from tailor.errors import UnsupportedModelError
from tailor.ir.model import Model, _first_line
from tailor.ir.ort import random_inputs

__all__ = [
    "WholeTiming",
    "KernelProfile",
    "session_options",
    "time_model",
    "Reference",
    "time_relative",
    "ProfiledSession",
    "annotate",
    "profile_model",
    "corrected",
    "profiler_overhead",
]

logger = logging.getLogger(__name__)

_SUFFIX = re.compile(r"(_token_\d+|/duplicated|_nchwc|_output_\d+_nchwc)$")


@dataclass
class WholeTiming:
    """Whole-model latency in milliseconds over `runs` timed runs.

    `p10_ms`, the 10th percentile, is what to compare on a shared machine: runs that
    another process preempted only ever add time, and on the 2-core development machine
    at load average 4, two interleaved passes over 87 models agreed within +-10 % for 99 %
    of the models on their 10th percentiles but for 32 % on their medians.
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    p10_ms: float
    min_ms: float
    runs: int

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> WholeTiming:
        """The statistics of a list of run times (at least two)."""
        q1, median, q3 = statistics.quantiles(times_ms, n=4)
        p10 = float(np.quantile(times_ms, 0.1))
        return cls(median, q1, q3, p10, min(times_ms), len(times_ms))


@dataclass
class KernelProfile:
    """Per-kernel times from onnxruntime's profiler, in microseconds per run.

    Attributes:
        kernels: the model's kernels.
        kernel_us: time of each kernel, averaged over the fastest profiled runs.
        unattributed_us: time of onnxruntime nodes that map to no kernel.
        run_us: median of the profiler's whole-run durations of those runs.
        runs: profiled runs (after warm-up).
        calls: onnxruntime nodes run per kernel in one run.
    """

    kernels: list[Kernel]
    kernel_us: list[float]
    unattributed_us: float
    run_us: float
    runs: int
    calls: list[float]


def session_options(
    threads: int, *, profile_prefix: str | None = None, optimized_path: str | None = None
) -> ort.SessionOptions:
    """Options for timing: every graph optimization, `threads` intra-op threads, one
    inter-op thread, sequential execution (what a deployed batch-1 session runs)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
    return opts


def _session(model: Model, opts: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model.to_bytes(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise UnsupportedModelError(f"onnxruntime cannot run the model: {_first_line(e)}") from e


def time_model(
    model: Model, *, threads: int = 1, warmup: int = 10, runs: int = 100, seed: int = 0
) -> WholeTiming:
    """Batch-1 latency of the whole model: `warmup` runs, then `runs` timed ones.

    Raises:
        UnsupportedModelError: onnxruntime cannot load the model.
    """
    sess = _session(model, session_options(threads))
    feeds = random_inputs(model, batch=1, seed=seed)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(max(2, runs)):
        start = time.perf_counter_ns()
        sess.run(None, feeds)
        times.append((time.perf_counter_ns() - start) / 1e6)
    return WholeTiming.of(times)


class Reference:
    """A model timed beside others (:func:`time_relative`): its session is kept."""

    def __init__(self, model: Model, *, threads: int = 1, seed: int = 0):
        self.threads = threads
        self.session = _session(model, session_options(threads))
        self.feeds = random_inputs(model, batch=1, seed=seed)


def time_relative(
    model: Model, reference: Reference, *, warmup: int = 10, runs: int = 60, blocks: int = 6
) -> tuple[WholeTiming, WholeTiming]:
    """Times `model` and `reference` in alternating blocks (`runs` each in all): the
    machine's drift (clock ramps, neighbours) then hits both alike, and their ratio is
    steadier than either figure. Returns (the model's timing, the reference's).

    Raises:
        UnsupportedModelError: onnxruntime cannot load the model.
    """
    sess = _session(model, session_options(reference.threads))
    feeds = random_inputs(model, batch=1, seed=0)
    for _ in range(warmup):
        sess.run(None, feeds)
        reference.session.run(None, reference.feeds)
    per_block = max(1, runs // blocks)
    mine: list[float] = []
    theirs: list[float] = []
    for _ in range(blocks):
        for session, inputs, times in (
            (sess, feeds, mine),
            (reference.session, reference.feeds, theirs),
        ):
            for _ in range(per_block):
                start = time.perf_counter_ns()
                session.run(None, inputs)
                times.append((time.perf_counter_ns() - start) / 1e6)
    return WholeTiming.of(mine), WholeTiming.of(theirs)


def _strip(name: str) -> str:
    while True:
        stripped = _SUFFIX.sub("", name)
        if stripped == name:
            return name
        name = stripped


def _attribute(
    model: Model, found: list[Kernel], optimized: onnx.ModelProto
) -> dict[str, int | None]:
    """Kernel index of each node of onnxruntime's optimized graph (None: no kernel)."""
    by_node = {name: i for i, k in enumerate(found) for name in k.nodes}
    by_tensor: dict[str, int] = {}
    for n in model.nodes:
        if n.name in by_node:
            for t in n.outputs:
                by_tensor[t.name] = by_node[n.name]
    anchors = {i for i, k in enumerate(found) if k.kind in ("conv", "gemm")}
    owner: dict[str, int | None] = {}
    for n in optimized.graph.node:
        index = None
        for candidate in (n.name, _strip(n.name)):
            index = by_node.get(candidate, by_tensor.get(candidate))
            if index is not None:
                break
        if index is None:
            for out in n.output:
                index = by_tensor.get(out, by_tensor.get(_strip(out)))
                if index is not None:
                    break
        owner[n.name] = index
    producer = {o: n.name for n in optimized.graph.node for o in n.output}
    readers: dict[str, list[str]] = defaultdict(list)
    for n in optimized.graph.node:
        for t in n.input:
            readers[t].append(n.name)
    # Nodes onnxruntime added (reorders, transposes): the kernel whose anchor they follow
    # or feed, else any neighbour's; repeated so chains of added nodes resolve too.
    for _ in range(4):
        for n in optimized.graph.node:
            if owner[n.name] is not None:
                continue
            before = [owner.get(producer[t]) for t in n.input if t in producer]
            after = [owner.get(r) for o in n.output for r in readers[o]]
            before = [i for i in before if i is not None]
            after = [i for i in after if i is not None]
            choice = next((i for i in before if i in anchors), None)
            if choice is None:
                choice = next((i for i in after if i in anchors), None)
            if choice is None:
                choice = (before or after or [None])[0]
            owner[n.name] = choice
    return owner


def _label(node: onnx.NodeProto) -> str:
    return node.op_type + ("@nchwc" if node.domain.endswith("nchwc") else "")


def _set_runtime_ops(
    found: list[Kernel], optimized: onnx.ModelProto, owner: dict[str, int | None]
) -> None:
    ops: list[list[str]] = [[] for _ in found]
    for n in optimized.graph.node:
        index = owner.get(n.name)
        if index is not None:
            ops[index].append(_label(n))
    for k, labels in zip(found, ops, strict=True):
        k.runtime_ops = sorted(labels)


def annotate(model: Model, found: list[Kernel] | None = None, *, threads: int = 1) -> list[Kernel]:
    """Fills each kernel's `runtime_ops`: the nodes onnxruntime's optimizer on this
    machine turns it into (`QLinearConv`, `Conv@nchwc`, `ReorderInput@nchwc`, a float
    `Conv` with its `DequantizeLinear` inputs, ...). Nothing is run.

    Raises:
        UnsupportedModelError: onnxruntime cannot load the model.
    """
    found = kernels(model) if found is None else found
    with tempfile.TemporaryDirectory(prefix="tailor-optimized-") as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        _session(model, session_options(threads, optimized_path=path))
        optimized = onnx.load(path, load_external_data=False)
    _set_runtime_ops(found, optimized, _attribute(model, found, optimized))
    return found


def _runs(events: list[dict]) -> list[tuple[int, int]]:
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"]
    return sorted(spans)


class ProfiledSession:
    """An onnxruntime session of one model with the profiler on.

    Run it in as many bursts as wanted (interleaved with other models' sessions, so the
    machine's load drifts over all alike), then :meth:`finish` for per-kernel times.

    Raises:
        UnsupportedModelError: onnxruntime cannot load the model.
    """

    def __init__(
        self,
        model: Model,
        found: list[Kernel] | None = None,
        *,
        threads: int = 1,
        warmup: int = 5,
        seed: int = 0,
    ):
        self.model = model
        self.kernels = kernels(model) if found is None else found
        self.warmup = warmup
        self._tmp = tempfile.TemporaryDirectory(prefix="tailor-profile-")
        self._optimized = str(Path(self._tmp.name) / "optimized.onnx")
        opts = session_options(
            threads,
            profile_prefix=str(Path(self._tmp.name) / "profile"),
            optimized_path=self._optimized,
        )
        try:
            self._sess = _session(model, opts)
        except UnsupportedModelError:
            self._tmp.cleanup()
            raise
        self._feeds = random_inputs(model, batch=1, seed=seed)
        self.run(warmup)

    def run(self, count: int) -> None:
        """Runs the model `count` times."""
        for _ in range(count):
            self._sess.run(None, self._feeds)

    def finish(self, *, fastest: float = 0.25) -> KernelProfile:
        """Ends profiling; per-kernel times are means over the `fastest` share of the
        profiled runs (at least three): a run another process preempted is slow in
        whichever kernel the preemption hit."""
        try:
            events = json.loads(Path(self._sess.end_profiling()).read_text())
            optimized = onnx.load(self._optimized, load_external_data=False)
        finally:
            self._tmp.cleanup()
        return _profile(self.model, self.kernels, optimized, events, self.warmup, fastest)


def _profile(
    model: Model,
    found: list[Kernel],
    optimized: onnx.ModelProto,
    events: list[dict],
    warmup: int,
    fastest: float,
) -> KernelProfile:
    owner = _attribute(model, found, optimized)
    _set_runtime_ops(found, optimized, owner)
    spans = _runs(events)[warmup:]
    if not spans:
        raise UnsupportedModelError("onnxruntime's profiler recorded no runs of the model")
    per_run = np.zeros((len(spans), len(found)))
    calls = np.zeros((len(spans), len(found)))  # onnxruntime nodes run per kernel
    unattributed = np.zeros(len(spans))
    starts = [s for s, _ in spans]
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        run = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if run < 0 or e["ts"] > spans[run][1]:
            continue  # a warm-up run
        index = owner.get(name[: -len("_kernel_time")])
        if index is None:
            unattributed[run] += e["dur"]
        else:
            per_run[run, index] += e["dur"]
            calls[run, index] += 1
    durations = np.asarray([end - start for start, end in spans], dtype=float)
    keep = max(min(3, len(spans)), int(round(fastest * len(spans))))
    chosen = np.argsort(durations, kind="stable")[:keep]
    return KernelProfile(
        found,
        [float(v) for v in per_run[chosen].mean(axis=0)],
        float(unattributed[chosen].mean()),
        float(np.median(durations[chosen])),
        len(spans),
        [float(v) for v in calls[chosen].mean(axis=0)],
    )


def profile_model(
    model: Model,
    found: list[Kernel] | None = None,
    *,
    threads: int = 1,
    warmup: int = 5,
    runs: int = 40,
    seed: int = 0,
) -> KernelProfile:
    """Per-kernel times of `model` from onnxruntime's profiler (see
    :class:`ProfiledSession`).

    Args:
        found: the model's kernels (computed when omitted).
        threads: intra-op threads.
        warmup: runs left out of the figures (they are profiled too).
        runs: profiled runs; the fastest quarter of them count.

    Raises:
        UnsupportedModelError: onnxruntime cannot load the model.
    """
    session = ProfiledSession(model, found, threads=threads, warmup=warmup, seed=seed)
    session.run(runs)
    return session.finish()


def corrected(
    profile: KernelProfile, total_us: float, *, per_node_us: float | None = None
) -> list[float]:
    """Per-kernel times with the profiler's own cost taken out.

    The profiler adds a few microseconds to every node it times (2-6 us on the
    development machine, against about 1 us for a tiny Relu unprofiled), which would
    swamp small kernels. `per_node_us` (see :func:`profiler_overhead`) is taken from
    each onnxruntime node; without it, the amount is chosen so that the kernels add up to
    the unprofiled whole-model time `total_us`. No kernel drops below a tenth of its
    profiled time.
    """
    if per_node_us is None:
        nodes = sum(profile.calls)
        excess = sum(profile.kernel_us) + profile.unattributed_us - total_us
        per_node_us = max(0.0, excess / nodes) if nodes else 0.0
    return [
        max(0.1 * us, us - per_node_us * c)
        for us, c in zip(profile.kernel_us, profile.calls, strict=True)
    ]


def profiler_overhead(profiles: Sequence[KernelProfile], totals_us: Sequence[float]) -> float:
    """The profiler's cost per onnxruntime node, in microseconds, fitted over many models.

    Models `profiled - unprofiled = d * nodes + e * unprofiled` (`e`: whatever else makes
    profiled runs slower or faster in proportion) by least relative error; one model at a
    time cannot tell `d` from `e`, many models of different sizes can.
    """
    rows, target = [], []
    for p, total in zip(profiles, totals_us, strict=True):
        if total <= 0:
            continue
        rows.append([sum(p.calls) / total, 1.0])
        target.append((sum(p.kernel_us) + p.unattributed_us - total) / total)
    if len(rows) < 2:
        return 0.0
    (d, _), *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(target), rcond=None)
    return max(0.0, float(d))
