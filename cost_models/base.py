"""Plain data every cost model returns: a number, its unit and where it came from.

DESIGN.md: a report always says where a number came from. Every figure a cost model
produces is an :class:`Estimate` carrying a `source` label; per-layer figures sit in a
:class:`LayerCost`, whole-model ones in a :class:`ModelCost`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["SOURCES", "Source", "Estimate", "LayerCost", "ModelCost"]

Source = Literal[
    "exact",  # counted from the model itself (bytes, MACs, params, tensor sizes)
    "measured",  # timed or metered on the device (onnxruntime, a TVM module, RAPL, INA rails)
    "tvm-tuned",  # best time in a MetaSchedule tuning database
    "learned",  # a regressor trained on the target's own measurements
    "roofline",  # the target's peak compute and bandwidth figures
    "analytic",  # a published formula (AdaDeep's energy model)
    "power-model",  # latency times the target's active power above idle
]
SOURCES: tuple[str, ...] = Source.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Estimate:
    """One figure with its unit and its source.

    Attributes:
        value: the number, in `unit`.
        unit: `ms`, `mJ`, `B` (bytes), `MAC`, `params`.
        source: one of :data:`SOURCES`.
        note: what the number assumes or leaves out, for reports ("int8 weights decoded at
            load"), empty when nothing needs saying.
    """

    value: float
    unit: str
    source: str
    note: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown cost source {self.source!r}; known: {', '.join(SOURCES)}")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "unit": self.unit, "source": self.source}
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class LayerCost:
    """The figures of one layer (a weighted node and what runs fused with it).

    Attributes:
        name: the weighted node's name.
        op: its op type.
        nodes: every node counted in this layer (the weighted node first, then the
            elementwise nodes fused into it).
        metrics: figure name (`latency_ms`, `energy_mj`, `storage_bytes`, `macs`, `params`,
            ...) to its estimate.
    """

    name: str
    op: str
    nodes: list[str] = field(default_factory=list)
    metrics: dict[str, Estimate] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "nodes": list(self.nodes),
            "metrics": {k: v.as_dict() for k, v in self.metrics.items()},
        }


@dataclass
class ModelCost:
    """Per-layer and whole-model figures of one model on one target."""

    target: str
    layers: list[LayerCost] = field(default_factory=list)
    total: dict[str, Estimate] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "total": {k: v.as_dict() for k, v in self.total.items()},
            "layers": [layer.as_dict() for layer in self.layers],
        }
