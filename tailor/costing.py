"""The cost models put together for one target: what `tailor cost` prints and what the
scheduler judges candidates by.

Latency comes first, because energy follows it: with a latency (measured, learned or
roofline) the energy is the target's power model over that time, never MACs alone (an
int8 model that runs slower costs more energy; ISPA 2018). Storage is the exact file
size, peak memory the weights plus the largest set of live activations, MACs exact.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tailor.cost_models.base import Estimate, LayerCost, ModelCost
from tailor.cost_models.energy import layer_energy, model_energy
from tailor.cost_models.latency import estimate_latency
from tailor.cost_models.latency_measure import Reference, time_model, time_relative
from tailor.cost_models.macs import layer_macs, model_macs
from tailor.cost_models.memory import peak_memory
from tailor.cost_models.storage import layer_storage, model_storage
from tailor.ir.model import Model
from tailor.targets import Target, get_target

__all__ = ["CostFunction", "cost_function", "model_cost"]

logger = logging.getLogger(__name__)


def model_cost(
    model: Model | str,
    target: Target | str = "host",
    *,
    latency_source: str = "auto",
    measure: bool = True,
    threads: int | None = None,
    runs: int = 100,
    cache_dir: str | None = None,
    rpc: str | None = None,
    key: str | None = None,
) -> ModelCost:
    """Per-layer and whole-model latency, energy, storage, MACs and peak memory.

    Per-layer rows are the latency model's kernels (a weighted node and what runs fused
    with it, or a standalone node); MACs, parameters, weight storage and energy attach to
    the kernel of their layer.
    """
    target = get_target(target)
    path = model if isinstance(model, str) else None
    loaded = Model.load(model) if isinstance(model, str) else model
    runtime = "tvm" if rpc else "onnxruntime"
    kernels, latency = estimate_latency(
        loaded,
        target,
        source=latency_source,  # type: ignore[arg-type]
        measure=measure,
        runtime=runtime,  # type: ignore[arg-type]
        threads=threads,
        runs=runs,
        cache_dir=cache_dir,
        rpc=rpc,
        key=key,
    )
    latencies = {k.name: k.metrics["latency_ms"] for k in kernels if "latency_ms" in k.metrics}
    energies = layer_energy(loaded, target, latencies)
    macs = layer_macs(loaded)
    storage = layer_storage(loaded)
    rows: dict[str, LayerCost] = {}
    for k in kernels:
        rows[k.name] = LayerCost(k.name, k.op, list(k.nodes), dict(k.metrics))
    # A weighted node the latency model folded into another kernel still gets its row's
    # figures: find the kernel that holds it.
    owner = {n: k.name for k in kernels for n in k.nodes}
    for name, figures in macs.items():
        row = rows.get(owner.get(name, name))
        if row is None:
            row = rows[name] = LayerCost(name, figures["macs"].note or "", [name], {})
        row.metrics.setdefault("macs", figures["macs"])
        row.metrics.setdefault("params", figures["params"])
        if name in storage:
            row.metrics.setdefault("storage_bytes", storage[name])
    for name, estimate in energies.items():
        row = rows.get(owner.get(name, name))
        if row is not None:
            row.metrics.setdefault("energy_mj", estimate)
    total = {"latency_ms": latency}
    total["energy_mj"] = model_energy(loaded, target, latency)["energy_mj"]
    total["storage_bytes"] = model_storage(path if path is not None else loaded)
    total.update({"macs": model_macs(loaded)["macs"], "params": model_macs(loaded)["params"]})
    memory = peak_memory(loaded)
    total["peak_memory_bytes"] = memory["peak_memory_bytes"]
    total["weights_bytes"] = memory["weights_bytes"]
    total["activations_peak_bytes"] = memory["activations_peak_bytes"]
    return ModelCost(target.name, list(rows.values()), total)


class CostFunction:
    """`costs(model) -> {latency, energy, storage, peak_memory, macs}` for the scheduler,
    with `sources` saying where each figure came from (after the first call)."""

    def __init__(
        self,
        target: Target,
        *,
        latency_source: str = "auto",
        threads: int = 1,
        runs: int = 60,
        rpc: str | None = None,
        key: str | None = None,
    ):
        self.target = target
        self.rpc, self.key = rpc, key
        self.latency_source = latency_source
        self.threads = threads
        self.runs = runs
        self.sources: dict[str, str] = {}
        self._reference: tuple[Reference, float] | None = None

    def set_reference(self, model: Model, latency_ms: float) -> None:
        """From now on, measured latencies are timed beside `model` (in alternating
        blocks) and given as `latency_ms` times their ratio to it: a search compares
        candidates with the baseline, and the ratio is immune to the machine's drift
        (on the 2-core VM, the same ResNet read 0.63 to 0.84 ms over one search)."""
        if self._timed_here:
            self._reference = (Reference(model, threads=self.threads), float(latency_ms))

    @property
    def _timed_here(self) -> bool:
        """Latency is timed with onnxruntime on this machine (not predicted, not on boards)."""
        native = self.target.device_type == "cpu" and self.target.is_native
        return self.rpc is None and native and self.latency_source in ("auto", "measured")

    def _latency(self, model: Model) -> Estimate:
        if self.rpc is not None:
            # A device farm: each candidate is compiled for the target and timed on a
            # board the tracker hands out.
            _, estimate = estimate_latency(
                model,
                self.target,
                source="measured",
                runtime="tvm",
                rpc=self.rpc,
                key=self.key,
                runs=self.runs,
            )
            return estimate
        if self._reference is not None:  # only set where latency is timed here
            reference, reference_ms = self._reference
            mine, theirs = time_relative(model, reference, runs=self.runs)
            return Estimate(
                reference_ms * mine.p10_ms / theirs.p10_ms,
                "ms",
                "measured",
                f"onnxruntime, 10th percentile of {mine.runs} runs over the reference's, "
                "timed in alternating blocks, times the reference's latency",
            )
        if self._timed_here:
            # Whole-model time only: the scheduler needs no per-kernel profile.
            timing = time_model(model, threads=self.threads, runs=self.runs)
            # The 10th percentile, not the median: on a busy machine the median of one
            # candidate's runs moved by up to half between near-identical plans, and the
            # search ranked that noise (see WholeTiming).
            return Estimate(
                timing.p10_ms,
                "ms",
                "measured",
                f"onnxruntime, 10th percentile of {timing.runs} runs",
            )
        _, estimate = estimate_latency(
            model,
            self.target,
            source=self.latency_source,  # type: ignore[arg-type]
            measure=False,
            threads=self.threads,
        )
        return estimate

    def __call__(self, model: Model) -> dict[str, Any]:
        latency = self._latency(model)
        energy = model_energy(model, self.target, latency)["energy_mj"]
        figures: Mapping[str, Estimate] = {
            "latency": latency,
            "energy": energy,
            "storage": model_storage(model),
            "peak_memory": peak_memory(model)["peak_memory_bytes"],
            "macs": model_macs(model)["macs"],
        }
        self.sources = {k: v.source for k, v in figures.items()}
        return {k: float(v.value) for k, v in figures.items()}


def cost_function(
    target: Target | str,
    *,
    latency_source: str = "auto",
    threads: int = 1,
    rpc: str | None = None,
    key: str | None = None,
) -> CostFunction:
    """The scheduler's cost function for `target` (see :class:`CostFunction`); with `rpc`
    and `key`, latency is measured on the boards behind that TVM RPC tracker."""
    return CostFunction(
        get_target(target), latency_source=latency_source, threads=threads, rpc=rpc, key=key
    )
