"""Runs every lossless clean-up pass to a fixed point: the `fuse` alias.

One round is fold_constants, eliminate_noops, fold_pad, fold_batchnorm,
matmul_add_to_gemm, eliminate_dead; rounds repeat until one changes nothing (at most
`max_rounds`), because one rewrite exposes another (a folded shape makes a Reshape a
no-op, a removed Identity puts a Pad next to its Conv).
"""

from __future__ import annotations

import logging
from typing import Any

from tailor.ir.model import Model
from tailor.passes.base import Param, Pass, PassContext, PassResult
from tailor.passes.eliminate_dead import EliminateDead
from tailor.passes.eliminate_noops import EliminateNoops
from tailor.passes.fold_batchnorm import FoldBatchNorm
from tailor.passes.fold_constants import FoldConstants
from tailor.passes.fold_pad import FoldPad
from tailor.passes.matmul_add_to_gemm import MatMulAddToGemm
from tailor.passes.registry import register

__all__ = ["Fuse", "FUSE_PASSES"]

logger = logging.getLogger(__name__)

#: The passes of one round, in order.
FUSE_PASSES: tuple[type[Pass], ...] = (
    FoldConstants,
    EliminateNoops,
    FoldPad,
    FoldBatchNorm,
    MatMulAddToGemm,
    EliminateDead,
)


@register
class Fuse(Pass):
    """Runs every lossless clean-up pass until nothing changes (the `fuse` alias).

    One round: fold_constants, eliminate_noops, fold_pad, fold_batchnorm,
    matmul_add_to_gemm, eliminate_dead; each gets this pass's `layers` selector.
    """

    name = "fuse"
    lossless = True
    params = (
        Param(
            "max_rounds",
            "int",
            10,
            "most rounds before giving up on a fixed point",
            low=1,
            high=100,
        ),
        Param(
            "max_bytes",
            "int",
            16 << 20,
            "largest tensor fold_constants may create, in bytes",
            low=0,
        ),
    )

    def run(self, model: Model, context: PassContext) -> PassResult:
        layers = self.config["layers"]
        passes = [
            cls(layers=layers, max_bytes=self.config["max_bytes"])
            if cls is FoldConstants
            else cls(layers=layers)
            for cls in FUSE_PASSES
        ]
        changes: list[str] = []
        notes: dict[str, dict[str, Any]] = {}
        for round_no in range(1, self.config["max_rounds"] + 1):
            modified = False
            for slots in notes.values():  # why-not reasons describe the latest round only
                for slot in slots.values():
                    slot.pop("skipped", None)
            for p in passes:
                result = p.run(model, context)
                model = result.model
                if result.modified:
                    modified = True
                    changes.extend(f"{p.name}: {line}" for line in result.changes)
                for layer, note in result.layer_notes.items():
                    slot = notes.setdefault(layer, {}).setdefault(p.name, {})
                    for key, value in note.items():
                        if key == "applied":
                            slot.setdefault(key, []).extend(value)
                        else:
                            slot[key] = value
            if not modified:
                logger.info("fuse reached a fixed point after %d round(s)", round_no)
                break
        else:
            logger.warning(
                "fuse still changed the model after %d rounds; stopping", self.config["max_rounds"]
            )
        return PassResult(model, bool(changes), changes, notes)
