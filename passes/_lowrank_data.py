"""Calibration statistics of the low-rank passes: the input Grams `XᵀX` that the
data-aware (whitened) SVD fits on, and each replaced layer's output error measured on
its own inputs.

Activations are reduced batch by batch (Grams and squared-error sums), never kept, and
captured in runs that stay under a memory budget.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from tailor.ir.activations import capture
from tailor.ir.model import Model, Variable
from tailor.passes._bias import BiasShift, delta_shape
from tailor.passes._capture import CAPTURE_BATCH, EMPTY, capture_units, sample_bytes
from tailor.passes._lowrank_chain import Factorization, build_chain

__all__ = ["MAX_GRAM_FEATURES", "input_grams", "local_output_errors"]

logger = logging.getLogger(__name__)

#: Input features above which a data-aware fit is not attempted (a d x d float64 Gram).
MAX_GRAM_FEATURES = 8192
#: Float64 Gram bytes gathered in one calibration run.
_GRAM_BUDGET = 512 << 20


class _PairErrors:
    """A `capture` reducer accumulating `||cand - ref||²` and `||ref||²` over pairs of
    tensors, batch by batch, without keeping the activations."""

    def __init__(self, pairs: Mapping[str, str]):
        self.partner: dict[str, tuple[str, bool]] = {}
        for ref, cand in pairs.items():
            self.partner[ref] = (cand, True)
            self.partner[cand] = (ref, False)
        self.stash: dict[str, np.ndarray] = {}
        self.num: dict[str, float] = defaultdict(float)
        self.den: dict[str, float] = defaultdict(float)

    def __call__(self, name: str, batch: np.ndarray) -> np.ndarray:
        other, is_ref = self.partner[name]
        if other not in self.stash:
            self.stash[name] = batch
            return EMPTY
        mate = self.stash.pop(other)
        ref, cand = (batch, mate) if is_ref else (mate, batch)
        ref64 = np.asarray(ref, np.float64)
        key = name if is_ref else other
        self.num[key] += float(np.sum((np.asarray(cand, np.float64) - ref64) ** 2))
        self.den[key] += float(np.sum(ref64**2))
        return EMPTY

    def rel(self, ref: str) -> float:
        num, den = math.sqrt(self.num[ref]), math.sqrt(self.den[ref])
        return num / den if den else (0.0 if num == 0.0 else float("inf"))


class _Grams:
    """A `capture` reducer accumulating `XᵀX` of layer inputs (rows: features last, or
    features second-to-last for `W @ x`)."""

    def __init__(self, wanted: Mapping[str, set[bool]]):
        self.wanted = {k: set(v) for k, v in wanted.items()}
        self.grams: dict[tuple[str, bool], np.ndarray] = {}
        self.rows: dict[tuple[str, bool], int] = defaultdict(int)

    def __call__(self, name: str, batch: np.ndarray) -> np.ndarray:
        for features_first in self.wanted[name]:
            x = np.asarray(batch, np.float64)
            if features_first and x.ndim >= 2:
                x = np.swapaxes(x, -1, -2)
            x = x.reshape(-1, x.shape[-1])
            key = (name, features_first)
            g = x.T @ x
            self.grams[key] = self.grams[key] + g if key in self.grams else g
            self.rows[key] += x.shape[0]
        return EMPTY


def input_grams(
    model: Model, wanted: Mapping[str, set[bool]], data: Mapping[str, np.ndarray]
) -> tuple[dict[tuple[str, bool], np.ndarray], dict[tuple[str, bool], int]]:
    """`XᵀX` and row counts of the named activations on the data, in runs that keep the
    float64 Grams under a memory budget.

    Args:
        wanted: tensor name -> orientations (`True`: features on the second-to-last axis,
            the `x` of `W @ x`).
    """
    cost: dict[str, int] = {}
    for name, orientations in wanted.items():
        shape = model.shape(model.tensor(name)) or []
        cost[name] = 0
        for features_first in orientations:
            dim = shape[-2 if features_first else -1] if len(shape) >= 2 else 1
            cost[name] += 8 * (dim if isinstance(dim, int) and dim > 0 else 1) ** 2
    grams: dict[tuple[str, bool], np.ndarray] = {}
    rows: dict[tuple[str, bool], int] = {}
    batch: dict[str, set[bool]] = {}
    used = 0
    names = sorted(wanted)
    for i, name in enumerate(names):
        batch[name] = wanted[name]
        used += cost[name]
        if used >= _GRAM_BUDGET or i == len(names) - 1:
            reducer = _Grams(batch)
            capture(model, data, sorted(batch), batch_size=CAPTURE_BATCH, reduce=reducer)
            grams.update(reducer.grams)
            rows.update(reducer.rows)
            batch, used = {}, 0
    return grams, rows


def local_output_errors(
    original: Model,
    plans: Sequence[tuple[str, Factorization]],
    data: Mapping[str, np.ndarray],
    shifts: Mapping[str, BiasShift],
) -> dict[str, float]:
    """Output relative error `||y' - y|| / ||y||` of each replaced layer on its own inputs:
    each chain (with its bias shift) runs beside the original layer, reading the original
    model's activations, so a layer's figure does not include upstream errors."""
    probe = original.copy()
    pairs: dict[str, str] = {}
    names: dict[str, str] = {}
    for name, f in plans:
        node = probe.node(name)
        ref = node.outputs[0]
        dtype = ref.dtype if ref.dtype is not None else np.float32
        out = Variable(probe.unique_name(f"{ref.name}_lowrank"), dtype=dtype)
        build_chain(
            probe, f.factors, node.inputs[f.input_index], out, hint=f"{name}_probe", dtype=dtype
        )
        shift = shifts.get(ref.name)
        if shift is not None:
            const = probe.add_constant(
                f"{name}_probe_shift",
                shift.delta.reshape(delta_shape(shift.delta, shift.axis)).astype(dtype),
            )
            attrs = {"broadcast": 1} if probe.opset < 7 else {}
            out = probe.add_node(
                "Add", [out, const], name=f"{name}_probe_shift", attrs=attrs, dtype=dtype
            ).outputs[0]
        pairs[ref.name] = out.name
        names[name] = ref.name
    probe.toposort()
    errors = _PairErrors(pairs)
    units = [[ref, cand] for ref, cand in pairs.items()]
    costs = [2 * sample_bytes(original, ref) for ref in pairs]
    capture_units(probe, data, units, costs, errors)
    return {name: errors.rel(ref) for name, ref in names.items()}
