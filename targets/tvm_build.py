"""Compiles an ONNX model to a TVM module for a target: replaces hand-written TVM scripts
with one build path (ONNX import, Relax `zero` pipeline, DLight schedules for GPU kinds,
or a MetaSchedule database), export with the target's cross compiler, and local runs
checked against onnxruntime.

GPU targets compile without a GPU: their kernels come back as CUDA/OpenCL source
(:meth:`BuiltModule.device_sources`); running them needs the device (see
:mod:`tailor.targets.rpc`).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tailor.errors import TargetError, ToolchainError, UnsupportedModelError
from tailor.ir.equivalence import Comparison
from tailor.ir.model import Model, _first_line
from tailor.ir.ort import run_model
from tailor.targets.target import Target, get_target

__all__ = [
    "InputSpec",
    "BuiltModule",
    "Timing",
    "import_onnx",
    "build",
    "export_module",
    "run_local",
    "time_local",
    "make_inputs",
    "compare_outputs",
    "compare_with_onnxruntime",
    "elf_machine",
]

logger = logging.getLogger(__name__)

#: Module kinds whose code runs on a GPU; their source is what a GPU target emits.
_DEVICE_MODULE_KINDS = ("cuda", "opencl", "vulkan", "metal", "rocm")

#: ELF e_machine values (System V ABI) of the architectures tailor targets.
_ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm", 0xF3: "riscv"}


@dataclass(frozen=True)
class InputSpec:
    """One graph input as the compiled module expects it (static shape)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Timing:
    """Run times of a module from TVM's `time_evaluator`, in seconds."""

    mean_s: float
    median_s: float
    std_s: float
    results: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.median_s * 1e3:.3f} ms median ({len(self.results)} repeats)"


@dataclass
class BuiltModule:
    """A model compiled for a target.

    Attributes:
        target: the target it was compiled for.
        executable: the Relax VM executable (`tvm.relax.VMExecutable`).
        inputs: the inputs in call order, with the static shapes compiled in.
        outputs: the ONNX output names, in the order the module returns them.
        tuned: whether schedules came from a MetaSchedule database.
    """

    target: Target
    executable: Any
    inputs: list[InputSpec]
    outputs: list[str]
    tuned: bool = False

    def device_sources(self) -> dict[str, str]:
        """GPU kernel source by module kind (`cuda`, `opencl`); empty for CPU targets."""
        found: dict[str, list[str]] = {}

        def walk(module: Any) -> None:
            if module.kind in _DEVICE_MODULE_KINDS:
                found.setdefault(module.kind, []).append(module.inspect_source())
            for child in module.imports:
                walk(child)

        walk(self.executable.mod)
        return {kind: "\n".join(parts) for kind, parts in found.items()}

    def export(self, path: str | os.PathLike) -> Path:
        """Writes the module as a shared library (or `.tar` of objects); see
        :func:`export_module`."""
        return export_module(self, path)


def _as_model(source: Model | str | os.PathLike | bytes | onnx.ModelProto) -> Model:
    return source if isinstance(source, Model) else Model.load(source)


def import_onnx(
    model: Model,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
) -> tuple[Any, list[InputSpec]]:
    """The model as a Relax IRModule with static input shapes, weights bound as constants.

    A symbolic leading (batch) dimension becomes `batch`; other symbolic dimensions must
    be given in `input_shapes`.

    Raises:
        DynamicShapeError: a symbolic dimension other than the batch is not given.
        UnsupportedModelError: TVM's ONNX importer refuses the model (an operator, a type).
    """
    from tvm.relax.frontend.onnx import from_onnx

    shapes = dict(input_shapes or {})
    unknown = set(shapes) - {t.name for t in model.inputs}
    if unknown:
        names = ", ".join(t.name for t in model.inputs)
        raise UnsupportedModelError(
            f"input shape given for {', '.join(sorted(unknown))}, but the model's inputs are "
            f"{names}"
        )
    specs = []
    for t in model.inputs:
        shape = (
            tuple(int(d) for d in shapes[t.name])
            if t.name in shapes
            else model.static_shape(t, batch=batch)
        )
        dtype = str(np.dtype(t.dtype)) if t.dtype is not None else "float32"
        specs.append(InputSpec(t.name, shape, dtype))
    try:
        mod = from_onnx(
            model.to_proto(),
            shape_dict={s.name: list(s.shape) for s in specs},
            dtype_dict={s.name: s.dtype for s in specs},
            keep_params_in_input=False,
        )
    except Exception as e:  # the importer raises bare TVM and Python errors alike
        raise UnsupportedModelError(f"TVM cannot import the model: {_first_line(e)}") from e
    return mod, specs


def build(
    model: Model | str | os.PathLike | bytes | onnx.ModelProto,
    target: Target | str,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
    database: Any = None,
) -> BuiltModule:
    """Compiles `model` for `target`.

    Without a database, operators get TVM's default schedules (the `zero` pipeline, and
    DLight's GPU rules for GPU kinds); with a MetaSchedule database (see
    :mod:`tailor.targets.tune`), tuned schedules where the database has them.

    Raises:
        UnsupportedModelError: TVM cannot import or compile the model for this target.
        TargetError: TVM rejects the target.
    """
    import tvm
    from tvm import relax

    from tailor.targets._tvm import register_tensor_intrinsics

    target = get_target(target)
    model = _as_model(model)
    tvm_target = target.tvm()
    mod, specs = import_onnx(model, input_shapes=input_shapes, batch=batch)
    try:
        if database is not None:
            from tvm.s_tir.meta_schedule.relax_integration import compile_relax

            register_tensor_intrinsics(tvm_target)  # tuned traces may tensorize
            executable = compile_relax(database, mod, tvm_target, params=None)
        else:
            with tvm_target, tvm.transform.PassContext(opt_level=3):
                mod = relax.get_pipeline("zero")(mod)
                if target.is_gpu:
                    from tvm.s_tir import dlight as dl

                    # Without schedules GPU kernels do not compile; these are TVM's defaults.
                    mod = dl.ApplyDefaultSchedule(
                        dl.gpu.Matmul(),
                        dl.gpu.GEMV(),
                        dl.gpu.Reduction(),
                        dl.gpu.GeneralReduction(),
                        dl.gpu.Fallback(),
                    )(mod)
            executable = tvm.compile(mod, target=tvm_target)
    except Exception as e:  # TVM's errors carry no common base class worth naming
        raise UnsupportedModelError(
            f"TVM cannot compile the model for target {target.name!r}: {_first_line(e)}"
        ) from e
    outputs = [t.name for t in model.outputs]
    logger.info("compiled %s for %s (%s)", model.source, target.name, target.kind)
    return BuiltModule(target, executable, specs, outputs, tuned=database is not None)


def _compiler_hint(compiler: str) -> str:
    if "android" in compiler:
        return " (install the Android NDK and put toolchains/llvm/prebuilt/*/bin on PATH)"
    if compiler.startswith("aarch64-linux-gnu-"):
        return " (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)"
    return ""


def export_module(built: BuiltModule, path: str | os.PathLike) -> Path:
    """Writes the compiled module for the device, atomically.

    `.tar` writes the object files (no compiler needed; a TVM RPC server links them on the
    device); any other suffix links a shared library, with the target's cross compiler
    when the target's CPU is not this machine's.

    Raises:
        ToolchainError: the compiler is missing (the message names it) or linking fails.
    """
    from tvm.support import cc

    path = Path(path)
    target = built.target
    compiler: str | None
    if path.suffix == ".tar":
        from tvm.support.tar import tar

        fcompile, compiler = tar, None
    elif target.is_native:
        compiler = cc.get_cc()
        if compiler is None:
            raise ToolchainError(
                "no C++ compiler (g++, clang++) on PATH to link the module; install one or "
                "export a .tar"
            )
        fcompile = None
    else:
        compiler = target.cross_compiler
        if not compiler:
            raise ToolchainError(
                f"target {target.name!r} ({target.arch}) has no cross_compiler to link a shared "
                "library on this machine; set one in the target or export a .tar"
            )
        if shutil.which(compiler) is None:
            raise ToolchainError(
                f"cross compiler {compiler} for target {target.name!r} is not on PATH"
                + _compiler_hint(compiler)
            )
        fcompile = cc.cross_compiler(compiler)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        try:
            built.executable.export_library(str(tmp), fcompile=fcompile)
        except Exception as e:  # the compiler's own error, as TVM relays it
            raise ToolchainError(
                f"linking the module for {target.name!r} with {compiler or 'tar'} failed: "
                f"{_first_line(e)}"
            ) from e
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def elf_machine(path: str | os.PathLike) -> str | None:
    """The architecture an ELF file is built for (`aarch64`, `x86_64`), None if not ELF."""
    with open(path, "rb") as f:
        header = f.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    order = "little" if header[5] == 1 else "big"
    machine = int.from_bytes(header[18:20], order)
    return _ELF_MACHINES.get(machine, f"elf-machine-{machine:#x}")


def make_inputs(inputs: Sequence[InputSpec], *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds of the compiled shapes: standard normal floats, small non-negative ints."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, size=spec.shape).astype(bool)
        else:
            feeds[spec.name] = rng.integers(0, 4, size=spec.shape).astype(dtype)
    return feeds


def _arguments(built: BuiltModule, feeds: Mapping[str, np.ndarray], device: Any) -> list[Any]:
    """The feeds as TVM tensors on `device`, in the module's input order."""
    import tvm

    args = []
    for spec in built.inputs:
        if spec.name not in feeds:
            raise ValueError(f"no value for input {spec.name!r}")
        value = np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
        if tuple(value.shape) != spec.shape:
            raise ValueError(
                f"input {spec.name!r} has shape {value.shape}; the module was compiled for "
                f"{spec.shape}"
            )
        args.append(tvm.runtime.tensor(value, device))
    return args


def _outputs(built: BuiltModule, result: Any) -> dict[str, np.ndarray]:
    """The VM's result (a tensor or a nested tuple of them) as arrays by output name."""
    flat: list[np.ndarray] = []

    def walk(value: Any) -> None:
        if hasattr(value, "numpy"):
            flat.append(value.numpy())
        else:
            for item in value:
                walk(item)

    walk(result)
    names = built.outputs if len(built.outputs) == len(flat) else []
    return {(names[i] if names else f"output_{i}"): array for i, array in enumerate(flat)}


def _check_local(target: Target) -> None:
    if target.is_gpu or not target.is_native:
        raise TargetError(
            f"target {target.name!r} ({target.kind}, {target.arch}) cannot run on this machine "
            f"({platform.machine()}); run it on the device through a TVM RPC tracker "
            "(--rpc HOST:PORT --key NAME)"
        )


def run_local(built: BuiltModule, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs a module compiled for a CPU target of this machine's architecture.

    Raises:
        TargetError: the target is a GPU or another architecture (use RPC).
    """
    import tvm
    from tvm import relax

    _check_local(built.target)
    device = tvm.cpu()
    vm = relax.VirtualMachine(built.executable, device)
    return _outputs(built, vm["main"](*_arguments(built, feeds, device)))


def time_local(
    built: BuiltModule,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    number: int = 10,
    repeat: int = 3,
) -> Timing:
    """Times the module on this machine with TVM's `time_evaluator`."""
    import tvm
    from tvm import relax

    _check_local(built.target)
    device = tvm.cpu()
    vm = relax.VirtualMachine(built.executable, device)
    args = _arguments(built, feeds or make_inputs(built.inputs), device)
    return _time(vm, device, args, number=number, repeat=repeat)


def _time(vm: Any, device: Any, args: list[Any], *, number: int, repeat: int) -> Timing:
    result = vm.time_evaluator("main", device, number=number, repeat=repeat)(*args)
    return Timing(
        float(result.mean),
        float(result.median),
        float(result.std),
        [float(r) for r in result.results],
    )


def compare_outputs(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
) -> Comparison:
    """How far `candidate` is from `reference`, outputs matched by position, with the
    semantics of :func:`tailor.ir.compare`: relative errors are to each reference output's
    largest finite magnitude; NaN against NaN (or the same infinity) agrees, NaN on one
    side is an infinite error."""
    ref, cand = list(reference.items()), list(candidate.values())
    if len(ref) != len(cand):
        raise ValueError(f"{len(ref)} reference outputs but {len(cand)} candidate outputs")
    per: dict[str, tuple[float, float]] = {}
    for (name, a), b in zip(ref, cand, strict=True):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.shape != b64.shape:
            raise ValueError(f"output {name!r}: shape {a64.shape} against {b64.shape}")
        with np.errstate(invalid="ignore"):
            diff = np.abs(a64 - b64)
        diff[(a64 == b64) | (np.isnan(a64) & np.isnan(b64))] = 0.0
        diff[np.isnan(diff)] = np.inf
        abs_err = float(np.max(diff)) if a64.size else 0.0
        finite = np.abs(a64[np.isfinite(a64)])
        scale = float(np.max(finite)) if finite.size else 0.0
        rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf"))
        per[name] = (abs_err, rel)
    return Comparison(
        max_abs=max((v[0] for v in per.values()), default=0.0),
        max_rel=max((v[1] for v in per.values()), default=0.0),
        per_output=per,
    )


def compare_with_onnxruntime(
    model: Model | str | os.PathLike | bytes | onnx.ModelProto,
    built: BuiltModule,
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    run: Callable[[BuiltModule, Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> Comparison:
    """Runs the module (locally, or with `run`, e.g. over RPC) and onnxruntime on the same
    inputs and compares the outputs."""
    model = _as_model(model)
    feeds = dict(feeds) if feeds is not None else make_inputs(built.inputs, seed=seed)
    reference = run_model(model, feeds)
    candidate = (run or run_local)(built, feeds)
    return compare_outputs(reference, candidate)
