"""Small TVM workarounds shared by the build, RPC and tuning modules: replaces TVM's
import-everything tensor-intrinsic registration with a per-target one, and MetaSchedule's
`LocalBuilder` (new worker processes for every batch) with a builder whose workers live
for many batches.

Why: `import tvm.s_tir.tensor_intrin` (done by every MetaSchedule `TuneContext` and by the
default builder in each worker process) registers the intrinsics of every back end; in
apache-tvm 0.27 the CUDA ones alone take about a minute of CPU, which made a builder
worker time out before building anything. A CPU target needs only its own ISA's set.
And each new worker imports TVM (3-4 s of CPU): per batch, that outweighed building.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "register_tensor_intrinsics",
    "meta_schedule_build",
    "build_and_export",
    "pooled_builder",
    "background_runner",
    "shutdown_workers",
    "ignore_sigint",
    "quiet_tvm",
]

logger = logging.getLogger(__name__)

_PACKAGE = "tvm.s_tir.tensor_intrin"


def _intrinsic_modules(target: Any) -> list[str]:
    """The tensor_intrin submodules a target's schedule rules may name."""
    kind = target.kind.name
    if kind == "cuda":
        return ["cuda"]
    if kind == "rocm":
        return ["rocm"]
    if kind != "llvm":
        return []
    triple = str(target.attrs.get("mtriple", "") or "")
    keys = [str(k) for k in target.keys]
    if triple.startswith(("aarch64", "arm")) or "arm_cpu" in keys:
        return ["arm_cpu"]
    if triple.startswith("riscv"):
        return ["riscv_cpu"]
    return ["x86"]


def register_tensor_intrinsics(target: Any) -> None:
    """Registers only the tensor intrinsics `target` can use, without importing the rest.

    Installs an empty `tvm.s_tir.tensor_intrin` package (its submodules stay importable),
    so TVM's own `import tvm.s_tir.tensor_intrin` becomes a no-op; if TVM already
    imported the full package, nothing changes.
    """
    import tvm.s_tir

    if _PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(_PACKAGE)
        if spec is None:  # a TVM without the package: nothing to register
            return
        package = importlib.util.module_from_spec(spec)
        sys.modules[_PACKAGE] = package
        tvm.s_tir.tensor_intrin = package
    for name in _intrinsic_modules(target):
        importlib.import_module(f"{_PACKAGE}.{name}")


def meta_schedule_build(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default build, minus the all-back-end intrinsic import.

    Runs in MetaSchedule's builder worker processes, which import it by module name.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    register_tensor_intrinsics(target)
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def build_and_export(job: tuple[Any, Any]) -> str:
    """Builds one candidate `(IRModule, target)` in a worker and writes it as a `.tar` of
    objects (what MetaSchedule's runners upload; an RPC server links it on the device)."""
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export

    mod, target = job
    return default_export(meta_schedule_build(mod, target, None))


def _warm_up(target_config: dict[str, Any]) -> None:
    """Imports TVM and the target's intrinsics in a fresh worker."""
    import tvm

    register_tensor_intrinsics(tvm.target.Target(target_config))


def pooled_builder(
    max_workers: int,
    timeout_sec: float,
    target_config: dict[str, Any] | None = None,
    recycle_after: int = 32,
) -> Any:
    """A MetaSchedule builder whose worker processes build `recycle_after` candidates
    each before they are replaced (TVM restarts its pool per batch for a memory leak of
    long-lived workers; replacing each worker now and then bounds that as well).

    With `target_config` (a TVM target dict), the workers start importing TVM at once,
    while the search for the first batch runs.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class _PooledBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool = PopenPoolExecutor(
                max_workers=max_workers,
                timeout=timeout_sec,
                initializer=ignore_sigint,
                maximum_process_uses=recycle_after,
            )
            if target_config is not None:
                for _ in range(max_workers):
                    self.pool.submit(_warm_up, target_config)

        def build(self, build_inputs):
            jobs = [(item.mod, item.target) for item in build_inputs]
            results = []
            for outcome in self.pool.map_with_error_catching(build_and_export, jobs):
                if outcome.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(outcome.value, None))
                elif outcome.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {timeout_sec:g} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {outcome.value}"))
            return results

    return _PooledBuilder()


def background_runner(make: Callable[[], Any]) -> Any:
    """A MetaSchedule runner made by `make()` in a background thread.

    TVM's runners start a worker process (which imports TVM) and wait for it in their
    constructor; made in the background, that overlaps the search for the first batch.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner

    @derived_object
    class _BackgroundRunner(PyRunner):
        def __init__(self) -> None:
            super().__init__()
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tailor-runner")
            self.future = executor.submit(make)
            executor.shutdown(wait=False)

        def run(self, runner_inputs):
            return self.future.result().run(runner_inputs)

    return _BackgroundRunner()


def shutdown_workers(*workers: Any) -> None:
    """Stops the worker processes of builders and runners now, not at garbage collection."""
    for worker in workers:
        future = getattr(worker, "future", None)
        if future is not None:
            try:
                worker = future.result()
            except Exception:  # a runner that failed to start has no workers
                continue
        pool = getattr(worker, "pool", None)
        if pool is not None:
            pool.shutdown(wait=True)


def ignore_sigint() -> None:
    """Worker initializer: Ctrl-C goes to the tuning process, which finishes the batch in
    flight and stops; workers killed by the same Ctrl-C would lose that batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def quiet_tvm(verbose: bool = False) -> None:
    """Keeps MetaSchedule's per-batch tables off the console (they stay in its log files)."""
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(level)
