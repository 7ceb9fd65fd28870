"""PassManager: runs passes in order, checks pre- and post-conditions around each, and
says which pass failed after which. Checks, timing and progress live here, not in passes."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from tailor.errors import DynamicShapeError, PassError, TailorError, VerificationError
from tailor.ir.equivalence import compare
from tailor.ir.model import Model, _first_line, over_protobuf_limit
from tailor.passes.base import Pass, PassContext
from tailor.passes.pipeline import Pipeline, parse_pipeline
from tailor.passes.registry import get_pass

__all__ = ["PassManager", "PassRecord", "PipelineResult", "check_model"]

logger = logging.getLogger(__name__)

_TWO_GIB = (1 << 31) - 1


@dataclass
class PassRecord:
    """What one pass did, for the report: its canonical text, changes, time and checks."""

    text: str
    modified: bool
    changes: list[str]
    layer_notes: dict[str, dict[str, Any]]
    seconds: float
    check: str = ""


@dataclass
class PipelineResult:
    """The final model, the canonical pipeline text and one record per pass."""

    model: Model
    pipeline: str
    records: list[PassRecord] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)


def check_model(model: Model, *, full: bool = True) -> None:
    """Runs the ONNX checker (with strict shape inference when `full`); VerificationError."""
    proto = model.to_proto()
    try:
        if over_protobuf_limit(proto, _TWO_GIB):
            onnx.checker.check_model(proto, full_check=False)
        else:
            onnx.checker.check_model(proto, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise VerificationError(f"the model is not valid ONNX: {_first_line(e)}") from e


class PassManager:
    """An ordered list of passes.

    Args:
        passes: pass instances, run in order.
    """

    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    @classmethod
    def from_text(cls, text: str) -> PassManager:
        """Builds passes from pipeline text (`fuse,svd(rank=0.25)`)."""
        return cls.from_pipeline(parse_pipeline(text))

    @classmethod
    def from_pipeline(cls, pipeline: Pipeline) -> PassManager:
        return cls([get_pass(call.name)(**dict(call.args)) for call in pipeline.calls])

    def to_text(self) -> str:
        """Canonical pipeline text: stored in outputs and reports so results reproduce."""
        return ",".join(p.to_text() for p in self.passes)

    def run(self, model: Model, context: PassContext | None = None) -> PipelineResult:
        """Runs every pass on a copy of the model; the input model is never modified.

        Raises:
            PassError: a pass failed; names it, its position, and the passes before it.
            VerificationError: a pass produced an invalid model or changed the outputs
                of a lossless rewrite.
        """
        ctx = context or PassContext()
        result = PipelineResult(model=model, pipeline=self.to_text())
        current = model
        if ctx.check != "none":
            check_model(current, full=False)
        for i, p in enumerate(self.passes):
            label = self._label(i)
            if ctx.progress is not None:
                ctx.progress(p.name, i, len(self.passes))
            start = time.perf_counter()
            try:
                # A pass works on a copy, so a failure half-way never leaks a broken graph.
                out = p.run(current.copy(), ctx)
            except TailorError as e:
                raise type(e)(f"{label} failed: {e}") from e
            except Exception as e:
                raise PassError(
                    f"{label} failed with an internal error ({type(e).__name__}: {_first_line(e)})"
                ) from e
            seconds = time.perf_counter() - start
            record = PassRecord(
                p.to_text(), out.modified, list(out.changes), dict(out.layer_notes), seconds
            )
            if out.modified and ctx.check != "none":
                try:
                    check_model(out.model, full=ctx.check == "full")
                    if p.lossless and ctx.check == "full":
                        record.check = self._verify_lossless(current, out.model, ctx)
                except TailorError as e:
                    raise VerificationError(f"{label} produced a bad model: {e}") from e
            logger.info(
                "%s: %s (%.2fs)", p.to_text(), "modified" if out.modified else "no change", seconds
            )
            result.records.append(record)
            current = out.model
        result.model = current
        return result

    def _label(self, i: int) -> str:
        text = f"pass {i + 1} {self.passes[i].to_text()!r}"
        if i:
            text += f" (after {', '.join(p.to_text() for p in self.passes[:i])})"
        return text

    @staticmethod
    def _verify_lossless(before: Model, after: Model, ctx: PassContext) -> str:
        feeds = None
        if ctx.calibration and all(t.name in ctx.calibration for t in before.inputs):
            # Only the model's inputs, in its dtypes: API callers hand in float64 arrays
            # or extra arrays (labels), which onnxruntime refuses.
            feeds = {}
            for t in before.inputs:
                value = np.asarray(ctx.calibration[t.name][:4])
                feeds[t.name] = value if t.dtype is None else value.astype(t.dtype, copy=False)
        try:
            cmp = compare(before, after, feeds, seed=ctx.seed)
        except DynamicShapeError as e:
            logger.info("skipping the numeric check: %s", e)
            return "numeric check skipped (dynamic input shapes)"
        if not cmp.within(ctx.rtol, ctx.atol):
            raise VerificationError(
                f"outputs changed ({cmp}); tolerance rtol={ctx.rtol}, atol={ctx.atol}"
            )
        return str(cmp)
