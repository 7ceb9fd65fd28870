"""One equivalence helper: run two models in onnxruntime on the same inputs and report
how far their outputs are apart."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from tailor.errors import VerificationError
from tailor.ir.model import Model
from tailor.ir.ort import random_inputs, run_model

__all__ = ["Comparison", "compare"]


@dataclass
class Comparison:
    """Distance between two models' outputs.

    `max_rel` is the largest absolute difference divided by the largest finite magnitude
    of the reference output (per output, then the worst), so it does not explode on zeros.
    Positions where both outputs are NaN, or the same infinity, agree.
    """

    max_abs: float
    max_rel: float
    per_output: dict[str, tuple[float, float]] = field(default_factory=dict)

    def within(self, rtol: float = 1e-5, atol: float = 0.0) -> bool:
        """True when every output is within `rtol` relative (to its scale) or `atol` absolute."""
        return all(a <= atol or r <= rtol for a, r in self.per_output.values())

    def __str__(self) -> str:
        return f"max abs error {self.max_abs:.3g}, max relative error {self.max_rel:.3g}"


def compare(
    reference: Model,
    candidate: Model,
    inputs: Mapping[str, np.ndarray] | None = None,
    *,
    batch: int = 2,
    seed: int = 0,
) -> Comparison:
    """Runs both models and compares their outputs, matched by position.

    Args:
        reference: the original model.
        candidate: the rewritten model (same inputs and outputs).
        inputs: feeds; random ones (see :func:`random_inputs`) when None.

    Raises:
        VerificationError: the models' outputs differ in number or shape.
    """
    feeds = dict(inputs) if inputs is not None else random_inputs(reference, batch=batch, seed=seed)
    ref = list(run_model(reference, feeds).items())
    cand = list(
        run_model(
            candidate, {k: v for k, v in feeds.items() if k in {t.name for t in candidate.inputs}}
        ).values()
    )
    if len(ref) != len(cand):
        raise VerificationError(f"the models have {len(ref)} and {len(cand)} outputs")
    per: dict[str, tuple[float, float]] = {}
    for (name, a), b in zip(ref, cand, strict=True):
        if a.shape != b.shape:
            raise VerificationError(
                f"output {name!r} has shape {a.shape} in the reference and {b.shape} in the candidate"
            )
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        with np.errstate(invalid="ignore"):
            diff = np.abs(a64 - b64)
        # NaN where both are NaN (Log of a random negative input) or the same infinity
        # is agreement; NaN on one side only is the worst disagreement, not a NaN error
        # that compares false with every tolerance and hides in max().
        diff[(a64 == b64) | (np.isnan(a64) & np.isnan(b64))] = 0.0
        diff[np.isnan(diff)] = np.inf
        abs_err = float(np.max(diff)) if a64.size else 0.0
        finite = np.abs(a64[np.isfinite(a64)])
        scale = float(np.max(finite)) if finite.size else 0.0
        per[name] = (
            abs_err,
            abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf")),
        )
    return Comparison(
        max_abs=max((v[0] for v in per.values()), default=0.0),
        max_rel=max((v[1] for v in per.values()), default=0.0),
        per_output=per,
    )
