"""Capture of intermediate activations on calibration data, through onnxruntime.

Data-driven passes (reconstruction after pruning, activation-based criteria, bias
correction) need what a layer sees and produces on real inputs. The requested tensors
are exposed as extra graph outputs of a copy of the model and gathered batch by batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from tailor.errors import TailorError
from tailor.ir._activation_cache import CACHE, data_key, upstream_keys
from tailor.ir.model import Model
from tailor.ir.ort import make_session

__all__ = ["capture", "iter_batches", "CalibrationError"]

logger = logging.getLogger(__name__)

Reducer = Callable[[str, np.ndarray], np.ndarray]


class CalibrationError(TailorError):
    """Calibration data do not fit the model (names, shapes, dtypes, sample counts)."""


def iter_batches(
    data: Mapping[str, np.ndarray], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Slices named arrays along their first axis into batches of `batch_size`."""
    counts = {k: len(v) for k, v in data.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"calibration arrays have different sample counts: {counts}")
    n = next(iter(counts.values()), 0)
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size] for k, v in data.items()}


def _validate(model: Model, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    feeds = {}
    for t in model.inputs:
        if t.name not in data:
            have = ", ".join(sorted(data)) or "none"
            raise CalibrationError(
                f"calibration data have no array for model input {t.name!r} (arrays: {have})"
            )
        value = np.asarray(data[t.name])
        shape = model.shape(t)
        if shape is not None:
            if value.ndim != len(shape):
                raise CalibrationError(
                    f"calibration array {t.name!r} has shape {value.shape}, the model expects rank {len(shape)} {shape}"
                )
            for axis, (have, want) in enumerate(zip(value.shape, shape, strict=True)):
                if axis and isinstance(want, int) and want > 0 and have != want:
                    raise CalibrationError(
                        f"calibration array {t.name!r} has shape {value.shape}, the model expects {shape}"
                    )
        if t.dtype is not None and value.dtype != np.dtype(t.dtype):
            want = np.dtype(t.dtype)
            # float64 -> float32 or uint8 -> float32 is what users mean; float -> int
            # (token ids, indices) would silently truncate, so that is refused.
            if not np.can_cast(value.dtype, want, casting="same_kind"):
                raise CalibrationError(
                    f"calibration array {t.name!r} has dtype {value.dtype}, the model expects {want}"
                )
            value = value.astype(want)
        feeds[t.name] = value
    if feeds and not len(next(iter(feeds.values()))):
        raise CalibrationError("calibration data hold no samples")
    return feeds


def _fixed_batch(model: Model) -> int | None:
    """The batch size a model was exported with (a static leading input dim), or None."""
    dims = set()
    for t in model.inputs:
        shape = model.shape(t)
        if shape and isinstance(shape[0], (int, np.integer)) and shape[0] > 0:
            dims.add(int(shape[0]))
    return dims.pop() if len(dims) == 1 else None


def capture(
    model: Model,
    data: Mapping[str, np.ndarray],
    tensors: Sequence[str],
    *,
    batch_size: int = 64,
    reduce: Reducer | None = None,
) -> dict[str, np.ndarray]:
    """Runs the model on `data` and returns the named intermediate tensors.

    Args:
        model: the model (not modified).
        data: arrays named like the model's inputs, samples along the first axis.
        tensors: names of tensors to capture (activations, graph inputs or outputs).
        batch_size: samples per onnxruntime call.
        reduce: optional `(name, batch) -> array` applied to every batch before it is
            kept, to bound memory (e.g. keep a random subset of spatial positions).

    Returns:
        Each requested tensor, batches concatenated along the first axis.
    """
    feeds = _validate(model, data)
    tensors = list(dict.fromkeys(tensors))  # a name asked for twice is captured once
    fixed = _fixed_batch(model)
    if fixed is not None:
        # A model exported with a fixed batch runs only that batch size.
        batch_size = fixed
    by_name = model.tensors()
    missing = [n for n in tensors if n not in by_name]
    if missing:
        raise CalibrationError(f"cannot capture {missing[0]!r}: no such tensor in the model")
    for name in tensors:
        if isinstance(by_name[name], gs.Constant):
            raise CalibrationError(f"cannot capture {name!r}: it is a constant, not an activation")
    input_names = {i.name for i in model.inputs}
    keys, cached = _lookup(model, feeds, [n for n in tensors if n not in input_names], batch_size)
    outputs = [n for n in tensors if n not in input_names and n not in cached]
    sess = _session(model, outputs) if outputs else None
    # Fresh values of cacheable tensors are kept for the cache while they fit in its share.
    fresh: dict[str, list[np.ndarray] | None] = {n: [] for n in outputs if n in keys}
    share = CACHE.limit // 4
    gathered: dict[str, list[np.ndarray]] = {n: [] for n in tensors}
    for index, batch in enumerate(iter_batches(feeds, batch_size)):
        real = len(next(iter(batch.values()))) if batch else 0
        if fixed is not None and 0 < real < fixed:
            # The last, partial batch is padded with its last sample; the extra rows are
            # dropped again before anything is kept.
            batch = {
                k: np.concatenate([v, np.repeat(v[-1:], fixed - real, axis=0)])
                for k, v in batch.items()
            }
        values = dict(zip(outputs, sess.run(outputs, batch), strict=True)) if sess else {}
        for name in tensors:
            if name in cached:
                value = cached[name][index]
            else:
                value = batch[name] if name in batch else values[name]
                if fixed is not None and real < fixed:
                    value = value[:real]
                kept = fresh.get(name)
                if kept is not None:
                    kept.append(value.copy())  # a reducer may edit its batch in place
                    if sum(v.nbytes for v in kept) > share:
                        fresh[name] = None
            gathered[name].append(reduce(name, value) if reduce else value)
    for name, kept in fresh.items():
        if kept:
            CACHE.put(keys[name], kept)
    return {n: np.concatenate(v, axis=0) if v else np.empty((0,)) for n, v in gathered.items()}


def _lookup(
    model: Model, feeds: Mapping[str, np.ndarray], names: Sequence[str], batch_size: int
) -> tuple[dict[str, bytes], dict[str, list[np.ndarray]]]:
    """(cache keys of the cacheable names, the cached batches found)."""
    if not CACHE.enabled or not names:
        return {}, {}
    data = data_key(feeds, batch_size)
    keys = {n: k + data for n, k in upstream_keys(model, names).items() if k is not None}
    cached = {}
    for name, key in keys.items():
        found = CACHE.get(key)
        if found is not None:
            cached[name] = found
    return keys, cached


def _session(model: Model, outputs: Sequence[str]):  # noqa: ANN202 - onnxruntime session
    """A session of a copy of `model` whose graph outputs include `outputs`."""
    probe = model.copy()
    by_name = probe.tensors()
    if any(by_name[n].dtype is None for n in outputs):
        # A graph output needs a type: a model loaded without shape inference has none.
        probe.infer_shapes()
    untyped = [n for n in outputs if by_name[n].dtype is None]
    if untyped:
        raise CalibrationError(f"cannot capture {untyped[0]!r}: its type cannot be inferred")
    for name in outputs:
        t = by_name[name]
        if not probe.is_graph_output(t):
            probe.graph.outputs.append(t)
    return make_session(probe)
