"""Capture of calibration activations in runs that stay under a memory budget, for the
passes that gather statistics layer by layer (bias correction, data-aware
factorization, per-layer errors).

:func:`tailor.ir.activations.capture` returns every requested tensor of every sample;
here the tensors are split into several runs so that one run's outputs stay under
`CAPTURE_BUDGET`, and the callers pass a reducer that keeps sums rather than
activations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tailor.errors import DynamicShapeError
from tailor.ir.activations import capture
from tailor.ir.model import Model

__all__ = [
    "CAPTURE_BATCH",
    "CAPTURE_BUDGET",
    "EMPTY",
    "MAX_SAMPLES",
    "capture_each",
    "capture_units",
    "sample_bytes",
    "subset",
]

logger = logging.getLogger(__name__)

#: Calibration samples used for statistics, bias correction and error measurement.
MAX_SAMPLES = 128
#: Activation bytes one onnxruntime call may return when capturing, and its batch size:
#: the tensors of many layers are captured in several runs rather than all at once.
CAPTURE_BUDGET = 256 << 20
CAPTURE_BATCH = 32
#: What a reducer returns for a batch it has folded into its own sums.
EMPTY = np.zeros((0,), np.float32)


def subset(data: Mapping[str, np.ndarray] | None, limit: int) -> dict[str, np.ndarray] | None:
    """The first `limit` samples of each array; None without data."""
    if not data:
        return None
    return {k: np.asarray(v)[:limit] for k, v in data.items()}


def sample_bytes(model: Model, name: str) -> int:
    """Bytes of one sample of an activation (1 MiB when its shape is not static)."""
    try:
        shape = model.static_shape(model.tensor(name), batch=1)
    except (DynamicShapeError, KeyError):
        return 1 << 20
    return 4 * math.prod(shape)


def capture_units(
    model: Model,
    data: Mapping[str, np.ndarray],
    units: Sequence[Sequence[str]],
    costs: Sequence[int],
    reduce: Any,
) -> dict[str, np.ndarray]:
    """`capture` of many tensors in runs whose outputs stay under a memory budget; the
    names of one unit (a tensor and its partner) are always captured together.

    Args:
        units: groups of tensor names captured in the same run.
        costs: bytes of one sample of each unit.
        reduce: the `capture` reducer applied to every batch.
    """
    out: dict[str, np.ndarray] = {}
    chunk: list[str] = []
    used = 0
    for unit, cost in zip(units, costs, strict=True):
        cost *= CAPTURE_BATCH
        if chunk and used + cost > CAPTURE_BUDGET:
            out.update(capture(model, data, chunk, batch_size=CAPTURE_BATCH, reduce=reduce))
            chunk, used = [], 0
        chunk.extend(unit)
        used += cost
    if chunk:
        out.update(capture(model, data, chunk, batch_size=CAPTURE_BATCH, reduce=reduce))
    return out


def capture_each(
    model: Model, data: Mapping[str, np.ndarray], names: Sequence[str], reduce: Any
) -> dict[str, np.ndarray]:
    """:func:`capture_units` with every tensor a unit of its own."""
    return capture_units(
        model, data, [[n] for n in names], [sample_bytes(model, n) for n in names], reduce
    )
