"""Plans: the scheduler's answer as plain data, and its exact replay.

A plan says, for each layer, which passes run on it, in what order and with what
parameters, plus the metrics predicted and measured for the result (each with its
source), the demands, the target and the versions of the tools. Its canonical pipeline
text (:func:`pipeline_text`) is what replays it: `tailor apply MODEL PLAN -o OUT` runs
exactly that text, so a plan committed next to a build script reproduces the model.

Passes run in stages whatever order a layer lists them in: channel pruning first (it
changes the shapes the others see), then factorizations, then int8 quantization, then the
storage passes. Layers that share a pass and its parameters share one call, so
calibration runs once per call, not once per layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tailor.errors import PlanError, TailorError
from tailor.passes import PassManager
from tailor.passes.base import format_value

__all__ = ["STAGES", "Step", "LayerPlan", "Plan", "pipeline_text", "layer_selector"]

logger = logging.getLogger(__name__)

#: Stage of each pass a plan may use: lower stages run first.
STAGES: dict[str, int] = {
    "prune_channels": 0,
    "tucker2": 1,
    "svd": 1,
    "spatial_svd": 1,
    "depthwise_separable": 1,
    "quantize": 2,
    "prune_weights": 3,
    "cluster_weights": 3,
    "quantize_weights": 3,
}
#: Passes that replace a layer by new nodes named `<layer>_<suffix>`.
_REPLACING = {"tucker2", "svd", "spatial_svd", "depthwise_separable"}
PLAN_VERSION = 1


@dataclass(frozen=True)
class Step:
    """One pass applied to one layer, with its parameters (not `layers`)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, **params: Any) -> Step:
        if name not in STAGES:
            raise PlanError(
                f"pass {name!r} cannot be part of a plan; plans use {', '.join(STAGES)}"
            )
        if "layers" in params:
            raise PlanError(f"step {name}: `layers` is set by the plan, not by a step")
        return cls(name, tuple(sorted(params.items())))

    def text(self) -> str:
        args = ",".join(f"{k}={format_value(v)}" for k, v in self.params)
        return f"{self.name}({args})" if args else self.name

    def as_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "params": dict(self.params)}


@dataclass
class LayerPlan:
    """What happens to one layer, and why."""

    layer: str
    op: str
    steps: list[Step] = field(default_factory=list)
    why: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layer": self.layer,
            "op": self.op,
            "passes": [s.as_dict() for s in self.steps],
        }
        if self.why:
            out["why"] = self.why
        if self.metrics:
            out["metrics"] = self.metrics
        return out


def layer_selector(names: Sequence[str], replaced: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    """A selector matching exactly `names` (and, for those in `replaced`, the nodes a
    factorization put in their place)."""
    terms = []
    for name in names:
        if "|" in name or name.startswith("!") or name.startswith("#") or "," in name:
            raise PlanError(f"layer name {name!r} cannot be written in a layer selector")
        escaped = "".join(f"[{c}]" if c in "*?[" else c for c in name)
        terms.append(escaped)
        if name in replaced:
            terms.append(f"{escaped}_*")
    return "|".join(terms)


def pipeline_text(layers: Sequence[LayerPlan], *, prefix: str = "fuse") -> str:
    """The canonical pipeline that applies the per-layer steps (see the module docstring)."""
    calls: dict[tuple[int, str], list[str]] = {}
    order: list[tuple[int, str]] = []
    replaced_before: dict[str, int] = {}
    for lp in layers:
        for step in lp.steps:
            if step.name in _REPLACING:
                replaced_before[lp.layer] = min(replaced_before.get(lp.layer, 9), STAGES[step.name])
    for lp in layers:
        seen: set[str] = set()
        for step in lp.steps:
            if step.name in seen:
                raise PlanError(f"layer {lp.layer!r} lists pass {step.name} twice")
            seen.add(step.name)
            key = (STAGES[step.name], step.text())
            if key not in calls:
                calls[key] = []
                order.append(key)
            calls[key].append(lp.layer)
    parts = [prefix] if prefix else []
    for stage, text in sorted(order, key=lambda k: (k[0], order.index(k))):
        names = calls[(stage, text)]
        replaced = {n for n in names if replaced_before.get(n, 9) < stage}
        selector = format_value(layer_selector(names, replaced))
        if text.endswith(")"):
            parts.append(f"{text[:-1]},layers={selector})")
        else:
            parts.append(f"{text}(layers={selector})")
    return ",".join(parts)


def _versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

    from tailor import __version__

    out = {
        "tailor": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import tvm

        out["tvm"] = str(tvm.__version__)
    except (
        Exception
    ):  # pragma: no cover - TVM is a dependency, but a broken one is no reason to fail
        pass
    return out


def model_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Plan:
    """A per-layer compression plan; see the module docstring."""

    layers: list[LayerPlan]
    target: str = "host"
    model_sha256: str = ""
    model_name: str = ""
    demands: dict[str, Any] = field(default_factory=dict)
    strategy: str = ""
    seed: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    unmet: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=_versions)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def pipeline(self) -> str:
        """The canonical pipeline text that replays this plan."""
        return PassManager.from_text(pipeline_text(self.layers)).to_text()

    def changed_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.steps]

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan_version": PLAN_VERSION,
            "model": {"name": self.model_name, "sha256": self.model_sha256},
            "target": self.target,
            "strategy": self.strategy,
            "seed": self.seed,
            "pipeline": self.pipeline,
            "demands": self.demands,
            "metrics": self.metrics,
            "unmet": list(self.unmet),
            "layers": [lp.as_dict() for lp in self.layers],
            "versions": dict(self.versions),
            "created": self.created,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Writes YAML (`.yaml`/`.yml`) or JSON (anything else), atomically."""
        path = Path(path)
        data = self.as_dict()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        else:
            text = json.dumps(data, indent=2) + "\n"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "<plan>") -> Plan:
        if not isinstance(data, Mapping) or "layers" not in data:
            raise PlanError(f"{origin}: not a tailor plan (no `layers`)")
        version = data.get("plan_version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"{origin}: plan version {version} is not {PLAN_VERSION}")
        layers = []
        for i, raw in enumerate(data["layers"] or []):
            if not isinstance(raw, Mapping) or "layer" not in raw:
                raise PlanError(f"{origin}: layer entry {i} has no `layer`")
            steps = []
            for s in raw.get("passes") or []:
                if not isinstance(s, Mapping) or "pass" not in s:
                    raise PlanError(f"{origin}: layer {raw['layer']!r}: a pass entry has no `pass`")
                params = s.get("params") or {}
                if not isinstance(params, Mapping):
                    raise PlanError(f"{origin}: layer {raw['layer']!r}: params must be a mapping")
                steps.append(Step.of(str(s["pass"]), **params))
            layers.append(
                LayerPlan(
                    str(raw["layer"]),
                    str(raw.get("op", "")),
                    steps,
                    str(raw.get("why", "")),
                    dict(raw.get("metrics") or {}),
                )
            )
        model = data.get("model") or {}
        plan = cls(
            layers=layers,
            target=str(data.get("target", "host")),
            model_sha256=str(model.get("sha256", "")),
            model_name=str(model.get("name", "")),
            demands=dict(data.get("demands") or {}),
            strategy=str(data.get("strategy", "")),
            seed=int(data.get("seed", 0)),
            metrics=dict(data.get("metrics") or {}),
            unmet=list(data.get("unmet") or []),
            versions=dict(data.get("versions") or {}),
            created=str(data.get("created", "")),
        )
        try:  # unknown passes or bad parameters fail here, naming the plan
            pipeline = plan.pipeline
        except TailorError as e:
            raise PlanError(f"{origin}: {e}") from e
        stored = data.get("pipeline")
        if stored is not None and stored != pipeline:
            raise PlanError(
                f"{origin}: its pipeline text does not match its layers (edited by hand?); "
                f"the layers give {pipeline!r}"
            )
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Reads a plan written by :meth:`save` (YAML or JSON; never executes anything)."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise PlanError(f"cannot read plan {os.fspath(path)!r}: {e.strerror}") from e
        try:
            data = yaml.safe_load(text)  # JSON is YAML
        except yaml.YAMLError as e:
            raise PlanError(f"plan {os.fspath(path)!r} is neither YAML nor JSON: {e}") from e
        return cls.from_dict(data, origin=os.fspath(path))


def plan_summary(plan: Plan) -> dict[str, Any]:
    """Counts of the layers each pass touches, for logs and reports."""
    counts: dict[str, int] = {}
    for lp in plan.layers:
        for s in lp.steps:
            counts[s.name] = counts.get(s.name, 0) + 1
    return {"layers": len(plan.layers), "changed": len(plan.changed_layers()), "passes": counts}
