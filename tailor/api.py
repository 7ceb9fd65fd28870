"""The public Python API: what the CLI calls, and what build scripts call directly.

Every function takes a path, bytes, a ModelProto or a :class:`~tailor.ir.Model`, and
raises only :class:`~tailor.errors.TailorError` subclasses for bad input.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from tailor import __version__
from tailor.errors import ModelLoadError, TailorError
from tailor.ir.layers import ModelSummary, summarize
from tailor.ir.model import Model
from tailor.passes import PassContext, PassManager, PipelineResult

if TYPE_CHECKING:
    from tailor.plan import Plan

__all__ = [
    "ModelSource",
    "load",
    "inspect_model",
    "load_calibration",
    "run_pipeline",
    "apply_plan",
    "parse_input_shape",
]

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | Model

#: metadata_props keys tailor writes into every model it saves.
PIPELINE_KEY = "tailor.pipeline"
VERSION_KEY = "tailor.version"


def load(source: ModelSource, *, input_shapes: Mapping[str, Sequence[int]] | None = None) -> Model:
    """Loads and checks a model, fixes `input_shapes` if given, and infers shapes.

    A :class:`Model` passed in is copied, never modified.
    """
    model = source.copy() if isinstance(source, Model) else Model.load(source)
    if input_shapes:
        model.set_input_shapes(dict(input_shapes))
    else:
        model.infer_shapes()
    return model


def inspect_model(
    source: ModelSource, *, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> ModelSummary:
    """The per-layer view (op, shapes, params, MACs, bytes) and whole-model totals."""
    return summarize(load(source, input_shapes=input_shapes))


def parse_input_shape(text: str) -> tuple[str | None, list[int]]:
    """Parses `name=1,3,224,224` (or `1,3,224,224` for a single-input model).

    Raises:
        TailorError: the text is not a name and a comma-separated list of positive ints.
    """
    name, sep, dims_text = text.rpartition("=")
    try:
        dims = [int(d) for d in dims_text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        dims = []
    if not dims or any(d < 1 for d in dims) or (sep and not name.strip()):
        raise TailorError(
            f"bad input shape {text!r}: expected NAME=D0,D1,... with positive integers"
        )
    return (name.strip() or None) if sep else None, dims


def load_calibration(path: str | os.PathLike, model: Model) -> dict[str, np.ndarray]:
    """Reads calibration data for `model` from `.npz` or `.npy`, without unpickling.

    An `.npz` gives one array per model input, named like the input. For a model with a
    single input, `FILE.npz:ARRAY` picks an array by name, and an `.npz` holding one
    array or an `.npy` file is used as is.

    Raises:
        TailorError: missing or unreadable file, object arrays, names that do not match
            the model's inputs, wrong rank or dtype.
    """
    text = os.fspath(path)
    key = None
    base, colon, tail = text.rpartition(":")
    if colon and base.endswith(".npz") and tail and not Path(text).exists():
        text, key = base, tail
    file = Path(text)
    if not file.is_file():
        raise TailorError(f"calibration file {text} does not exist")
    inputs = [t.name for t in model.inputs]
    try:
        # allow_pickle=False: a data file must never execute code.
        loaded = np.load(file, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {inputs[0] if len(inputs) == 1 else file.stem: loaded}
        else:
            with loaded:
                arrays = {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise TailorError(f"cannot read calibration file {text}: {e}") from e
    if key is not None:
        if key not in arrays:
            raise TailorError(
                f"calibration file {text} has no array {key!r} (it has: {', '.join(arrays)})"
            )
        if len(inputs) != 1:
            raise TailorError(
                f"{text}:{key} selects one array, but the model has {len(inputs)} inputs; "
                "name the arrays like the inputs instead"
            )
        arrays = {inputs[0]: arrays[key]}
    elif len(inputs) == 1 and len(arrays) == 1:
        arrays = {inputs[0]: next(iter(arrays.values()))}
    missing = [name for name in inputs if name not in arrays]
    if missing:
        raise TailorError(
            f"calibration file {text} has no array for input(s) {', '.join(map(repr, missing))} "
            f"(it has: {', '.join(arrays) or 'nothing'}); use FILE.npz:ARRAY for a single-input model"
        )
    data = {}
    for t in model.inputs:
        arr = arrays[t.name]
        shape = model.shape(t)
        if shape is not None and arr.ndim != len(shape):
            raise TailorError(
                f"calibration array for input {t.name!r} has shape {arr.shape}, "
                f"but the input has rank {len(shape)}"
            )
        if t.dtype is not None and arr.dtype != np.dtype(t.dtype):
            if not (np.issubdtype(arr.dtype, np.number) and np.issubdtype(t.dtype, np.number)):
                raise TailorError(
                    f"calibration array for input {t.name!r} has dtype {arr.dtype}, expected {np.dtype(t.dtype)}"
                )
            arr = arr.astype(t.dtype)
        data[t.name] = arr
    return data


def run_pipeline(
    source: ModelSource,
    pipeline: str,
    output: str | os.PathLike | None = None,
    *,
    calibration: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    check: str = "full",
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: Callable[[str, int, int], None] | None = None,
) -> PipelineResult:
    """Runs pipeline text on a model and, if `output` is given, saves the result.

    The pipeline is parsed and every parameter validated before any work starts. The
    output is written atomically only after every pass succeeded, with the canonical
    pipeline text in its metadata (`tailor.pipeline`), so a failed run leaves no file.

    Args:
        source: the model.
        pipeline: pipeline text, e.g. `fuse,prune_channels(ratio=0.3,layers=conv*)`.
        output: where to write the optimized `.onnx`; None: do not save.
        calibration: arrays by input name, or a `.npz`/`.npy` path (see
            :func:`load_calibration`).
        input_shapes: fixes symbolic input dimensions before the passes run.
        check: `full`, `basic` or `none` (see :class:`~tailor.passes.PassContext`).
        seed, rtol, atol, progress: see :class:`~tailor.passes.PassContext`.

    Returns:
        The final model, the canonical pipeline text and one record per pass.
    """
    manager = PassManager.from_text(pipeline)
    if output is not None:
        out = Path(output)
        if out.is_dir():
            raise TailorError(f"output {out} is a directory; give a file name such as model.onnx")
        if not out.parent.exists():
            raise TailorError(f"output folder {out.parent} does not exist")
    if check not in ("full", "basic", "none"):
        raise TailorError(f"check must be full, basic or none, got {check!r}")
    model = load(source, input_shapes=input_shapes)
    if calibration is not None and not isinstance(calibration, Mapping):
        calibration = load_calibration(calibration, model)
    context = PassContext(
        calibration=calibration,
        seed=seed,
        check=check,  # type: ignore[arg-type]
        rtol=rtol,
        atol=atol,
        progress=progress,
    )
    result = manager.run(model, context)
    result.model.set_metadata(PIPELINE_KEY, result.pipeline)
    result.model.set_metadata(VERSION_KEY, __version__)
    if output is not None:
        try:
            result.model.save(output)
        except OSError as e:
            raise TailorError(f"cannot write {output}: {e.strerror or e}") from e
        except ValueError as e:  # onnx refuses to serialize, e.g. a proto over 2 GiB
            raise ModelLoadError(f"cannot write {output}: {e}") from e
        logger.info("wrote %s", output)
    return result


def apply_plan(
    source: ModelSource,
    plan: Plan | str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    calibration: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    force: bool = False,
    check: str = "full",
    progress: Callable[[str, int, int], None] | None = None,
) -> PipelineResult:
    """Replays a plan on the model it was made for: its canonical pipeline, its seed.

    Args:
        source: the model (a path or bytes let the plan's model hash be checked).
        plan: a :class:`~tailor.plan.Plan` or the path of a plan file (YAML or JSON).
        output: where to write the result; None: do not save.
        calibration: the data the plan's data-driven passes need (pruning re-fits,
            int8 calibration), as for :func:`run_pipeline`.
        force: apply even when the model is not the one the plan was made for.

    Raises:
        PlanError: the plan is malformed, or was made for another model (without `force`).
    """
    from tailor.errors import PlanError
    from tailor.plan import Plan, model_digest

    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    data: bytes | None = None
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        data = Path(source).read_bytes()
    if data is not None and plan.model_sha256 and model_digest(data) != plan.model_sha256:
        message = (
            f"the plan was made for another model (sha256 {plan.model_sha256[:12]}..., "
            f"this one {model_digest(data)[:12]}...)"
        )
        if not force:
            raise PlanError(message + "; pass force=True (--force) to apply it anyway")
        logger.warning("%s; applying anyway", message)
    return run_pipeline(
        data if data is not None else source,
        plan.pipeline,
        output,
        calibration=calibration,
        check=check,
        seed=plan.seed,
        progress=progress,
    )
