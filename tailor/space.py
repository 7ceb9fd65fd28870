"""The candidate space of a model: the units the scheduler decides on and their options.

Two kinds of unit:
- a **channel group** (channels coupled across layers: residual trunks, concats,
  depthwise chains; `tailor.ir.dependency`): keep, or prune a fraction of its channels
  with least-squares channel selection and re-fit. Coupled layers are decided together,
  because pruning one of them prunes all.
- a **layer**: keep, a factorization that fits its shape (tucker2 for a k x k
  convolution, and spatial_svd (k x 1 then 1 x k); svd for a fully connected layer),
  int8 quantization, a storage pass (4-bit weights, a 16-entry codebook), or the mildest
  factorization composed with int8 or with 4-bit weights.

An option's payload maps each layer it touches to the ordered :class:`~tailor.plan.Step`
list, so an assignment (one option per unit) becomes a :class:`~tailor.plan.Plan`
by merging payloads (:func:`assignment_layers`). A layer may get steps from its group
unit and from its layer unit: pruning then quantization is such a composition.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tailor.ir.dependency import dependency_graph
from tailor.ir.layers import Layer, layers
from tailor.ir.model import Model
from tailor.passes._lowrank import MAX_COST_RATIO
from tailor.passes._lowrank_math import resolve_rank
from tailor.plan import LayerPlan, Step
from tailor.search.base import Option, Unit

__all__ = ["SpaceConfig", "build_space", "assignment_layers", "FEATURES"]

logger = logging.getLogger(__name__)

#: What each unit's feature vector holds (the rl agent's state), in order.
FEATURES = (
    "is_group",
    "is_conv",
    "is_fc",
    "log2_macs",
    "log2_params",
    "log2_in_channels",
    "log2_out_channels",
    "kernel",
    "log2_spatial",
    "position",
)


@dataclass(frozen=True)
class SpaceConfig:
    """Which options the space offers (the CLI's defaults)."""

    prune_ratios: tuple[float, ...] = (0.25, 0.375, 0.5, 0.625)
    tucker_ranks: tuple[float, ...] = (0.5, 0.25)
    spatial_ranks: tuple[float, ...] = (0.5,)
    svd_ranks: tuple[float, ...] = (0.5, 0.25)
    quantize: bool = True
    storage: bool = True
    compose: bool = True
    #: Layers with fewer MACs than this share of the model's total are only quantized
    #: or stored smaller: factorizing them saves nothing measurable.
    min_macs_share: float = 0.01


def _share(members: Sequence[Layer], total_macs: int, total_params: int) -> float:
    """The members' mean share of the model's MACs and parameters."""
    macs = sum(m.macs or 0 for m in members) / max(total_macs, 1)
    params = sum(m.params for m in members) / max(total_params, 1)
    return min(0.5 * (macs + params), 1.0)


def _features(
    layer: Layer | None, members: Sequence[Layer], position: float, total_macs: int
) -> np.ndarray:
    ref = layer or (members[0] if members else None)
    macs = sum(m.macs or 0 for m in members) if layer is None else (layer.macs or 0)
    params = sum(m.params for m in members) if layer is None else layer.params
    spatial = 1
    if ref is not None and ref.output_shape and len(ref.output_shape) > 2:
        spatial = math.prod(ref.output_shape[2:])
    return np.array(
        [
            float(layer is None),
            float(ref is not None and ref.op == "Conv"),
            float(ref is not None and ref.op in ("Gemm", "MatMul")),
            math.log2(max(macs, 1)),
            math.log2(max(params, 1)),
            math.log2(max(ref.in_channels if ref else 1, 1)),
            math.log2(max(ref.out_channels if ref else 1, 1)),
            float(max(ref.kernel) if ref and ref.kernel else 1),
            math.log2(max(spatial, 1)),
            position,
        ],
        dtype=np.float64,
    )


def _option(label: str, strength: float, payload: dict[str, list[Step]]) -> Option:
    return Option(label=label, payload=payload, strength=strength)


def _weights_after(layer: Layer, kind: str, rank: float) -> float:
    """The factorization's weights over the layer's, from its shape, with the ranks the
    passes resolve (`resolve_rank`)."""
    cin, cout = layer.in_channels, layer.out_channels
    kh, kw = (tuple(layer.kernel or (1, 1)) + (1, 1))[:2]
    before = cin * cout * kh * kw
    if kind == "tucker2":
        r_out, r_in = resolve_rank(rank, cout), resolve_rank(rank, cin)
        after = cin * r_in + r_in * r_out * kh * kw + r_out * cout
    elif kind == "spatial_svd":
        r = resolve_rank(rank, min(cin * kh, cout * kw))
        after = r * (cin * kh + cout * kw)
    else:  # svd
        after = resolve_rank(rank, min(cin, cout)) * (cin + cout)
    return after / max(before, 1)


def _layer_options(layer: Layer, config: SpaceConfig, total_macs: int) -> list[Option]:
    name = layer.name
    options = [_option("keep", 0.0, {})]
    big = (layer.macs or 0) >= config.min_macs_share * max(total_macs, 1)
    found: list[tuple[str, float]] = []
    if big and layer.op == "Conv" and layer.groups == 1 and max(layer.kernel or (1,)) > 1:
        if min(layer.in_channels, layer.out_channels) >= 8:
            found += [("tucker2", r) for r in config.tucker_ranks]
            found += [("spatial_svd", r) for r in config.spatial_ranks]
    if big and layer.op in ("Gemm", "MatMul") and min(layer.in_channels, layer.out_channels) >= 16:
        found += [("svd", r) for r in config.svd_ranks]
    # Only factorizations the pass may apply: one whose weights are not under its cost
    # ratio is skipped by the pass (it checks the MACs too), and measuring it alone would
    # spend an evaluation on the unchanged model (spatial_svd at rank 0.5 of a square 3x3
    # conv is exactly as large as the conv).
    factor = [
        (f"{kind}(rank={r})", 1.0 - r, Step.of(kind, rank=r))
        for kind, r in found
        if _weights_after(layer, kind, r) < MAX_COST_RATIO
    ]
    for label, strength, step in factor:
        options.append(_option(label, strength * 0.8, {name: [step]}))
    int8 = Step.of("quantize", mode="int8")
    bits4 = Step.of("quantize_weights", bits=4)
    if config.quantize:
        options.append(_option("quantize(int8)", 0.5, {name: [int8]}))
    if config.storage:
        options.append(_option("quantize_weights(bits=4)", 0.4, {name: [bits4]}))
        options.append(
            _option("cluster_weights(16)", 0.4, {name: [Step.of("cluster_weights", clusters=16)]})
        )
    # The mildest factorization composed with int8 (faster where integer kernels are) or
    # with 4-bit weights (about as fast as the factorization, a fraction of its bytes):
    # a unit takes one option, so without these a factorized layer could take neither.
    for label, strength, step in factor[:1] if config.compose else []:
        if config.quantize:
            options.append(_option(f"{label}+int8", min(1.0, strength + 0.3), {name: [step, int8]}))
        if config.storage:
            options.append(
                _option(f"{label}+4bit", min(1.0, strength + 0.2), {name: [step, bits4]})
            )
    return options


def build_space(model: Model, config: SpaceConfig | None = None) -> list[Unit]:
    """The units of `model` (shapes inferred, best after `fuse`) and their options.

    Channel groups come first (in the order of their first producer), then the layers in
    topological order. A unit with nothing but `keep` is left out.
    """
    config = config or SpaceConfig()
    found = layers(model)
    by_name = {layer.name: layer for layer in found}
    total = sum(layer.macs or 0 for layer in found)
    total_params = sum(layer.params for layer in found)
    units: list[Unit] = []
    order = {layer.name: i for i, layer in enumerate(found)}
    groups = []
    for g in dependency_graph(model).groups:
        producers = [p for p in g.producers if p in by_name]
        if not g.prunable or not producers or g.size < 4:
            continue
        groups.append((min(order[p] for p in producers), g, producers))
    for first, g, producers in sorted(groups, key=lambda item: item[0]):
        if not config.prune_ratios:
            break
        options = [_option("keep", 0.0, {})]
        for r in config.prune_ratios:
            step = Step.of("prune_channels", ratio=r, criterion="refit")
            options.append(_option(f"prune(ratio={r})", r, {p: [step] for p in producers}))
        members = [by_name[p] for p in producers] + [
            by_name[c] for c in g.consumers if c in by_name
        ]
        units.append(
            Unit(
                name=f"group {g.id}: {', '.join(producers[:3])}{' ...' if len(producers) > 3 else ''}",
                options=options,
                features=_features(None, members, first / max(len(found), 1), total),
                share=_share(members, total, total_params),
            )
        )
    for layer in found:
        options = _layer_options(layer, config, total)
        if len(options) > 1:
            units.append(
                Unit(
                    name=layer.name,
                    options=options,
                    features=_features(
                        layer, [layer], order[layer.name] / max(len(found), 1), total
                    ),
                    share=_share([layer], total, total_params),
                )
            )
    return units


def assignment_layers(
    model: Model, units: Sequence[Unit], assignment: Sequence[int]
) -> list[LayerPlan]:
    """The per-layer steps of an assignment, one LayerPlan per layer of the model."""
    steps: dict[str, list[Step]] = {}
    why: dict[str, list[str]] = {}
    for unit, choice in zip(units, assignment, strict=True):
        option = unit.options[choice]
        for layer, layer_steps in (option.payload or {}).items():
            steps.setdefault(layer, []).extend(layer_steps)
            why.setdefault(layer, []).append(f"{unit.name}: {option.label}")
    return [
        LayerPlan(
            layer.name,
            layer.op,
            list(steps.get(layer.name, [])),
            "; ".join(why.get(layer.name, [])),
        )
        for layer in layers(model)
    ]
