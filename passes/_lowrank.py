"""The driver of the factorization passes (`svd`, `tucker2`, `spatial_svd`,
`depthwise_separable`): selects layers, asks the pass how to factor each one, keeps only
factorizations that pay, splices the chains in, corrects biases and reports per-layer
ranks, parameters, MACs and errors.

The passes only say how to factor a weight; the rest lives in modules of its own:
the maths in :mod:`tailor.passes._lowrank_math` (ranks, SVDs, the whitened SVD), the
graph side in :mod:`tailor.passes._lowrank_chain` (factor chains, their cost, splicing),
calibration statistics in :mod:`tailor.passes._lowrank_data` (input Grams, per-layer
errors) and the bias correction, shared with `quantize`, in :mod:`tailor.passes._bias`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from tailor.ir.layers import is_layer_node, layer_weight, summarize
from tailor.ir.model import Model, Node
from tailor.passes._bias import BiasShift, correct_bias
from tailor.passes._capture import MAX_SAMPLES, subset
from tailor.passes._lowrank_chain import (
    Factorization,
    chain_macs,
    input_shape,
    layer_as_factor,
    replace_layer,
)
from tailor.passes._lowrank_data import local_output_errors
from tailor.passes.base import Param, Pass, PassContext, PassResult
from tailor.passes.rewrite import refresh_shapes

__all__ = ["BIAS_CORRECTION", "FORCE", "MAX_COST_RATIO", "LowRankPass"]

logger = logging.getLogger(__name__)

#: A factorization is applied only when its parameters and its MACs are both below this
#: fraction of the layer's (unless `force`): near break-even a chain of thinner layers
#: saves too little to pay for its extra nodes and the accuracy it loses.
MAX_COST_RATIO = 0.9

BIAS_CORRECTION = Param(
    "bias_correction",
    "bool",
    True,
    "with calibration data, shift each factorized layer's bias by its mean output error",
)
FORCE = Param(
    "force",
    "bool",
    False,
    f"factorize even layers where it saves less than {1 - MAX_COST_RATIO:.0%} of the "
    "parameters or MACs (the model may grow)",
)


def _too_costly(f: Factorization) -> str | None:
    """Why a factorization does not pay (parameters or MACs not below MAX_COST_RATIO)."""
    costs = [("params", f.params_before, f.params_after)]
    if f.macs_before and f.macs_after is not None:
        costs.append(("MACs", f.macs_before, f.macs_after))
    if all(after < MAX_COST_RATIO * before for _, before, after in costs):
        return None
    figures = ", ".join(
        f"{after:,} {what} for {before:,} ({after / before:.2f}x)" for what, before, after in costs
    )
    return (
        f"{f.describe()} gives {figures}: not below {MAX_COST_RATIO}x of both "
        "(force=true factorizes anyway)"
    )


# ---------------------------------------------------------------------- the driver
class LowRankPass(Pass):
    """Base of the factorization passes.

    Subclasses set `ops`, and implement :meth:`applicable` (structural reasons not to
    apply) and :meth:`factorize`; :meth:`statistics` may gather calibration statistics
    first. Layers are factored independently from the input model's weights; a
    factorization that does not cost under `MAX_COST_RATIO` of the layer's parameters
    and MACs is skipped with a note (applied anyway, and noted as `forced`, with
    `force`). The chains are spliced in together; with calibration data biases are then
    corrected (`bias_correction`) and each layer's output error is measured on its own
    inputs.
    """

    ops: ClassVar[tuple[str, ...]] = ()
    lossless = False

    def applicable(self, model: Model, node: Node) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def factorize(
        self, model: Model, node: Node, stats: Any
    ) -> Factorization | str:  # pragma: no cover - abstract
        raise NotImplementedError

    def statistics(
        self, model: Model, nodes: list[Node], data: Mapping[str, np.ndarray] | None
    ) -> tuple[dict[str, Any], list[str]]:
        """Per-layer statistics for :meth:`factorize`, and messages for the change list."""
        return {}, []

    def _common(self, model: Model, node: Node) -> str | None:
        found = layer_weight(model, node)
        assert found is not None
        weight = node.inputs[found[0]]
        readers = [n for n in weight.outputs if n is not node]
        if readers:
            return (
                f"its weight {weight.name} is shared with {len(readers)} other node(s); "
                "factorizing one reader would duplicate it"
            )
        return self.applicable(model, node)

    def run(self, model: Model, context: PassContext) -> PassResult:
        refresh_shapes(model)
        data = subset(context.calibration, MAX_SAMPLES)
        notes: dict[str, dict[str, Any]] = {}
        candidates = []
        for node in list(model.nodes):
            if node.op not in self.ops or not is_layer_node(model, node):
                continue
            if not self.selects(model, node):
                continue
            why = self._common(model, node)
            if why is not None:
                notes[node.name] = {"skipped": why}
                continue
            candidates.append(node)
        stats, messages = self.statistics(model, candidates, data)
        plans: list[tuple[Node, Factorization]] = []
        for node in candidates:
            found = self.factorize(model, node, stats.get(node.name))
            if isinstance(found, str):
                notes[node.name] = {"skipped": found}
                continue
            shape = input_shape(model, node, found.input_index)
            found.macs_before = chain_macs([layer_as_factor(model, node)], shape)
            found.macs_after = chain_macs(found.factors, shape)
            why = _too_costly(found)
            if why is not None:
                if not self.config.get("force", False):
                    notes[node.name] = {"skipped": why}
                    continue
                found.extra["forced"] = why
            plans.append((node, found))
        if not plans:
            logger.info("%s: nothing to factorize", self.name)
            return PassResult(model, False, messages, notes)
        original = model.copy()
        before = summarize(model)
        for node, f in plans:
            replace_layer(model, node, f)
        model.cleanup()
        refresh_shapes(model)
        named = [(node.name, f) for node, f in plans]
        outputs = {name: original.node(name).outputs[0].name for name, _ in named}
        shifts: dict[str, BiasShift] = {}
        if data is not None and self.config["bias_correction"]:
            done = correct_bias(original, model, {t: t for t in outputs.values()}, data)
            shifts = {t: s for t, s in done.items() if isinstance(s, BiasShift)}
            refresh_shapes(model)
        errors = local_output_errors(original, named, data, shifts) if data is not None else {}
        after = summarize(model)
        changes = [
            f"{self.name}: factorized {len(plans)} layer(s), model params "
            f"{before.params:,} -> {after.params:,}",
            *messages,
        ]
        for name, f in named:
            note: dict[str, Any] = {
                **({"rank": f.ranks["rank"]} if set(f.ranks) == {"rank"} else {"ranks": f.ranks}),
                "full_rank": f.full_ranks["rank"]
                if set(f.full_ranks) == {"rank"}
                else f.full_ranks,
                "params_before": f.params_before,
                "params_after": f.params_after,
                **(
                    {"macs_before": f.macs_before, "macs_after": f.macs_after}
                    if f.macs_before is not None
                    else {}
                ),
                "weight_rel_error": f.weight_rel_error,
                **f.extra,
            }
            text = f"weight rel. error {f.weight_rel_error:.2e}"
            if name in errors:
                note["output_rel_error"] = errors[name]
                text = f"output rel. error {errors[name]:.2e}, {text}"
            shift = shifts.get(outputs[name])
            if shift is not None:
                # A bias created by the correction is part of the layer's cost.
                note["params_after"] += shift.added_params
            if data is not None:
                note["bias_corrected"] = shift is not None
            notes[name] = note
            changes.append(
                f"{self.name} {name}: {f.describe()}, {f.params_before:,} -> "
                f"{note['params_after']:,} params, {text}"
            )
        if data is None and self.config["bias_correction"]:
            changes.append(
                "no calibration data: biases not corrected and errors measured on the weights "
                "(pass --data FILE.npz to correct biases and measure output errors)"
            )
        return PassResult(model, True, changes, notes)
