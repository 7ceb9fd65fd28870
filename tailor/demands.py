"""Demands: what the user asks of the tailored model (budgets) and what to optimise
(objective weights), from CLI flags, a YAML file or the API.

Budgets are hard limits (accuracy drop, latency, energy, storage, peak memory); the
objective ranks the plans that meet them by a weighted sum of min-max normalised metrics,
AdaDeep's importance coefficients (Liu et al., IEEE TMC 2021). The weights can also
follow the device's context, as in AdaDeep: a low battery raises the energy weight
(`mu_energy = max((4000 - battery_mAh) / 4000, 0.6)`, `mu_accuracy = 1 - mu_energy`), and
a small cache raises the storage weight.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from tailor.errors import DemandsError

__all__ = [
    "METRICS",
    "Demands",
    "Normalizer",
    "parse_quantity",
    "parse_weights",
    "context_weights",
    "load_demands",
]

logger = logging.getLogger(__name__)

#: The metrics a plan is judged on; all but accuracy are costs (lower is better).
METRICS = ("accuracy", "latency", "energy", "storage")

_UNITS: dict[str, dict[str, float]] = {
    "latency": {"ms": 1.0, "s": 1e3, "us": 1e-3, "µs": 1e-3},  # to ms
    "energy": {"mj": 1.0, "j": 1e3, "uj": 1e-3, "µj": 1e-3},  # to mJ
    "bytes": {
        "b": 1,
        "kb": 1e3,
        "mb": 1e6,
        "gb": 1e9,
        "kib": 1024,
        "mib": 1024**2,
        "gib": 1024**3,
    },
}
_DEFAULT_UNIT = {"latency": "ms", "energy": "mj", "bytes": "b"}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ%]*)\s*$")


def parse_quantity(text: str | float | int, kind: str, *, what: str = "") -> float:
    """A number with an optional unit, in the kind's base unit (ms, mJ or bytes).

    Args:
        text: `20ms`, `0.5 s`, `5mJ`, `4MB`, `512KiB`, or a bare number (base unit).
        kind: `latency`, `energy` or `bytes`.
        what: the flag or field, for messages.

    Raises:
        DemandsError: not a positive number, or a unit this kind does not take.
    """
    label = what or kind
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _NUMBER.match(str(text))
        if not m:
            raise DemandsError(f"{label}: {text!r} is not a number with a unit (e.g. 20ms, 4MB)")
        value, unit = float(m.group(1)), m.group(2).lower()
    units = _UNITS[kind]
    unit = unit or _DEFAULT_UNIT[kind]
    if unit not in units:
        raise DemandsError(
            f"{label}: unknown unit {unit!r} in {text!r}; use one of {', '.join(units)}"
        )
    if not value > 0 or not math.isfinite(value):
        raise DemandsError(f"{label}: {text!r} must be positive")
    return value * units[unit]


def _accuracy_drop(text: str | float) -> tuple[float, bool]:
    """(drop, relative): `1%`/`1pt` are points, `0.01` a fraction, `2%rel` relative."""
    raw = str(text).strip().lower().replace(" ", "")
    relative = raw.endswith("rel")
    raw = raw[:-3] if relative else raw
    try:
        if raw.endswith("%") or raw.endswith("pt"):
            value = float(raw.rstrip("%").removesuffix("pt")) / 100.0
        else:
            value = float(raw)
    except ValueError:
        raise DemandsError(
            f"max accuracy drop: {text!r} is not 1% (points), 0.01 (a fraction) or 2%rel "
            "(relative to the baseline)"
        ) from None
    if not 0.0 <= value < 1.0:
        raise DemandsError(f"max accuracy drop: {text!r} must be in [0, 100%)")
    return value, relative


def parse_weights(text: str | Mapping[str, Any]) -> dict[str, float]:
    """`latency=0.5,accuracy=0.3,energy=0.2` (or a mapping) -> weights summing to 1."""
    items: dict[str, Any]
    if isinstance(text, Mapping):
        items = dict(text)
    else:
        items = {}
        for part in str(text).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise DemandsError(f"weights: {part.strip()!r} is not METRIC=NUMBER")
            key, value = part.split("=", 1)
            items[key.strip()] = value.strip()
    weights = {}
    for key, value in items.items():
        if key not in METRICS:
            raise DemandsError(f"weights: unknown metric {key!r}; use {', '.join(METRICS)}")
        try:
            weights[key] = float(value)
        except (TypeError, ValueError):
            raise DemandsError(f"weights: {key}={value!r} is not a number") from None
        if weights[key] < 0 or not math.isfinite(weights[key]):
            raise DemandsError(f"weights: {key}={value!r} must be zero or positive")
    total = sum(weights.values())
    if not total > 0:
        raise DemandsError("weights: at least one weight must be positive")
    return {k: weights.get(k, 0.0) / total for k in METRICS}


def context_weights(
    battery_mah: float | None = None, cache_mb: float | None = None
) -> dict[str, float]:
    """Objective weights derived from the device's context (AdaDeep's rule).

    A battery of `b` mAh gives `mu_energy = max((4000 - b) / 4000, 0.6)` and
    `mu_accuracy = 1 - mu_energy` (AdaDeep, IEEE TMC 2021). AdaDeep ties storage to the
    cache size without a published formula; tailor's: a cache of `c` MiB takes
    `mu_storage = min(max((64 - c) / 64, 0), 0.5)` of the weight first, the rest is split
    as above (or evenly between accuracy and latency without a battery figure).
    """
    if battery_mah is not None and battery_mah < 0:
        raise DemandsError(f"battery: {battery_mah} mAh must be zero or positive")
    if cache_mb is not None and cache_mb < 0:
        raise DemandsError(f"cache: {cache_mb} MB must be zero or positive")
    storage = 0.0 if cache_mb is None else min(max((64.0 - cache_mb) / 64.0, 0.0), 0.5)
    rest = 1.0 - storage
    if battery_mah is not None:
        energy = max((4000.0 - battery_mah) / 4000.0, 0.6)
        weights = {"accuracy": rest * (1 - energy), "energy": rest * energy, "latency": 0.0}
    else:
        weights = {"accuracy": rest / 2, "latency": rest / 2, "energy": 0.0}
    weights["storage"] = storage
    return {k: weights[k] for k in METRICS}


@dataclass(frozen=True)
class Demands:
    """Budgets and objective weights.

    Attributes:
        max_accuracy_drop: the most accuracy may fall, a fraction (0.01 = 1 point), or
            relative to the baseline when `relative_accuracy_drop`; None: no limit.
        max_latency_ms, max_energy_mj, max_storage_bytes, max_peak_memory_bytes: budgets
            per inference (batch 1); None: no limit.
        weights: objective weight per metric in :data:`METRICS`, summing to 1.
        battery_mah, cache_mb: the context the weights were derived from, if any.
    """

    max_accuracy_drop: float | None = 0.01
    relative_accuracy_drop: bool = False
    max_latency_ms: float | None = None
    max_energy_mj: float | None = None
    max_storage_bytes: float | None = None
    max_peak_memory_bytes: float | None = None
    weights: Mapping[str, float] = field(
        default_factory=lambda: {"accuracy": 0.25, "latency": 0.5, "energy": 0.0, "storage": 0.25}
    )
    battery_mah: float | None = None
    cache_mb: float | None = None

    def accuracy_floor(self, baseline: float) -> float | None:
        """The lowest accuracy the budget allows, given the baseline's."""
        if self.max_accuracy_drop is None:
            return None
        if self.relative_accuracy_drop:
            return baseline * (1.0 - self.max_accuracy_drop)
        return baseline - self.max_accuracy_drop

    def violations(
        self, metrics: Mapping[str, float | None], baseline_accuracy: float
    ) -> list[str]:
        """Each budget `metrics` break, as a phrase ("latency 25.1 ms > 20 ms").

        `metrics` holds `accuracy`, `latency` (ms), `energy` (mJ), `storage` (bytes),
        `peak_memory` (bytes); a missing or None figure breaks no budget.
        """
        out = []
        floor = self.accuracy_floor(baseline_accuracy)
        acc = metrics.get("accuracy")
        if floor is not None and acc is not None and acc < floor - 1e-12:
            out.append(f"accuracy {acc:.4f} < {floor:.4f}")
        for key, limit, unit in (
            ("latency", self.max_latency_ms, "ms"),
            ("energy", self.max_energy_mj, "mJ"),
            ("storage", self.max_storage_bytes, "B"),
            ("peak_memory", self.max_peak_memory_bytes, "B"),
        ):
            value = metrics.get(key)
            if limit is not None and value is not None and value > limit:
                out.append(f"{key} {value:.4g} {unit} > {limit:.4g} {unit}")
        return out

    def with_context(self, battery_mah: float | None, cache_mb: float | None) -> Demands:
        """These demands with weights derived from the context (AdaDeep's rule)."""
        if battery_mah is None and cache_mb is None:
            return self
        return replace(
            self,
            weights=context_weights(battery_mah, cache_mb),
            battery_mah=battery_mah,
            cache_mb=cache_mb,
        )

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else v)
                for f in fields(self)}  # fmt: skip

    @classmethod
    def from_options(
        cls,
        *,
        max_accuracy_drop: str | float | None = None,
        max_latency: str | float | None = None,
        max_energy: str | float | None = None,
        max_storage: str | float | None = None,
        max_peak_memory: str | float | None = None,
        weights: str | Mapping[str, Any] | None = None,
        battery_mah: float | None = None,
        cache_mb: float | None = None,
        base: Demands | None = None,
    ) -> Demands:
        """Demands from flag-style values (`1%`, `20ms`, `5mJ`, `4MB`, `latency=0.5,...`).

        Values left None keep `base`'s (the defaults without one). Explicit `weights` win
        over weights derived from the context.
        """
        d = base or cls()
        changes: dict[str, Any] = {}
        if max_accuracy_drop is not None:
            changes["max_accuracy_drop"], changes["relative_accuracy_drop"] = _accuracy_drop(
                max_accuracy_drop
            )
        for key, value, kind, flag in (
            ("max_latency_ms", max_latency, "latency", "--max-latency"),
            ("max_energy_mj", max_energy, "energy", "--max-energy"),
            ("max_storage_bytes", max_storage, "bytes", "--max-storage"),
            ("max_peak_memory_bytes", max_peak_memory, "bytes", "--max-peak-memory"),
        ):
            if value is not None:
                changes[key] = parse_quantity(value, kind, what=flag)
        d = replace(d, **changes).with_context(battery_mah, cache_mb)
        if weights is not None:
            d = replace(d, weights=parse_weights(weights))
        return d


_YAML_KEYS = {
    "max_accuracy_drop",
    "max_latency",
    "max_energy",
    "max_storage",
    "max_peak_memory",
    "weights",
    "usage",
}


def load_demands(path: str | os.PathLike, *, base: Demands | None = None) -> Demands:
    """Demands from a YAML file.

    ```yaml
    max_accuracy_drop: 1%
    max_latency: 20ms
    max_storage: 4MB
    weights: {latency: 0.5, energy: 0.3, accuracy: 0.2}
    usage: {battery_mah: 1200, cache_mb: 8}   # or derive the weights from the context
    ```
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise DemandsError(f"cannot read demands file {os.fspath(path)!r}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise DemandsError(f"demands file {os.fspath(path)!r} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise DemandsError(f"demands file {os.fspath(path)!r} must hold a mapping of fields")
    unknown = sorted(set(data) - _YAML_KEYS)
    if unknown:
        raise DemandsError(
            f"demands file {os.fspath(path)!r}: unknown field {unknown[0]!r}; "
            f"fields: {', '.join(sorted(_YAML_KEYS))}"
        )
    usage = data.get("usage") or {}
    if not isinstance(usage, Mapping) or set(usage) - {"battery_mah", "cache_mb"}:
        raise DemandsError(
            f"demands file {os.fspath(path)!r}: usage takes battery_mah and cache_mb only"
        )
    return Demands.from_options(
        max_accuracy_drop=data.get("max_accuracy_drop"),
        max_latency=data.get("max_latency"),
        max_energy=data.get("max_energy"),
        max_storage=data.get("max_storage"),
        max_peak_memory=data.get("max_peak_memory"),
        weights=data.get("weights"),
        battery_mah=usage.get("battery_mah"),
        cache_mb=usage.get("cache_mb"),
        base=base,
    )


@dataclass(frozen=True)
class Normalizer:
    """Min-max normalisation of each metric over the candidates a search has seen, so
    weights compare metrics of different units and models (AdaDeep)."""

    low: Mapping[str, float]
    high: Mapping[str, float]

    @classmethod
    def over(cls, rows: list[Mapping[str, float | None]]) -> Normalizer:
        low, high = {}, {}
        for key in METRICS:
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                low[key], high[key] = min(values), max(values)  # type: ignore[type-var]
        return cls(low, high)

    def objective(self, metrics: Mapping[str, float | None], weights: Mapping[str, float]) -> float:
        """Weighted sum of normalised metrics in [0, 1]; lower is better.

        Accuracy counts as its shortfall from the best seen; a metric with no spread
        (or no figure) adds nothing.
        """
        total = 0.0
        for key in METRICS:
            w = weights.get(key, 0.0)
            value = metrics.get(key)
            lo, hi = self.low.get(key), self.high.get(key)
            if not w or value is None or lo is None or hi is None or hi <= lo:
                continue
            share = (hi - value) / (hi - lo) if key == "accuracy" else (value - lo) / (hi - lo)
            total += w * min(max(share, 0.0), 1.0)
        return total
