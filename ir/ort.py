"""Reference execution with onnxruntime (CPU), shared by equivalence checks, activation
capture and evaluators."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from tailor.errors import DynamicShapeError, UnsupportedModelError
from tailor.ir.model import Model, _first_line, over_protobuf_limit

__all__ = ["make_session", "run_model", "random_inputs"]

_TWO_GIB = (1 << 31) - 1


def make_session(
    model: Model | onnx.ModelProto, *, optimize: bool = False, threads: int = 0
) -> ort.InferenceSession:
    """An onnxruntime CPU session for `model`.

    Args:
        optimize: let onnxruntime fuse and fold (for timing); off for reference numerics,
            so what runs is exactly the graph tailor wrote.
        threads: intra-op threads (0: onnxruntime's default).
    """
    proto = model.to_proto() if isinstance(model, Model) else model
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = threads
    # Errors come back as exceptions (with the message); the passes try candidates that
    # may not run and handle it, so onnxruntime printing them too would only alarm.
    opts.log_severity_level = 4
    try:
        if over_protobuf_limit(proto, _TWO_GIB):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                onnx.save_model(proto, str(path), save_as_external_data=True, location="model.data")
                return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(
            proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises its own exception types
        raise UnsupportedModelError(f"onnxruntime cannot run the model: {_first_line(e)}") from e


def run_model(
    model: Model | ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    outputs: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Runs the model once; returns outputs by name."""
    sess = model if isinstance(model, ort.InferenceSession) else make_session(model)
    names = outputs or [o.name for o in sess.get_outputs()]
    values = sess.run(names, dict(feeds))
    return dict(zip(names, values, strict=True))


def random_inputs(model: Model, *, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every graph input: standard normal floats, small non-negative ints.

    A symbolic leading dimension becomes `batch`; any other symbolic dimension is an error.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in model.inputs:
        shape = model.static_shape(t, batch=batch)
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[t.name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[t.name] = rng.integers(0, 4, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[t.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise DynamicShapeError(f"cannot make random data for input {t.name!r} of type {dtype}")
    return feeds
