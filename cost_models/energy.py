"""Energy per inference, per layer and per model, in mJ, from three sources:

- `power-model`: a latency (measured, tuned, learned or roofline; passed in) times the
  target's active power above idle. Preferred whenever a latency exists: energy follows
  time, not arithmetic, and compression that cuts MACs can still cost energy (int8 on a
  Jetson TX2 GPU raised energy by 39 %, ISPA 2018).
- `analytic`: AdaDeep's model after Yang et al. (CVPR 2017), from the layer's counts
  alone; what is left when no latency is known.
- `measured`: energy counters read around repeated runs of a callable: Intel/AMD RAPL
  under /sys/class/powercap, or the INA3221 power rails of a Jetson.

The analytic model charges one unit `e` per MAC, `6e` per weight read from the on-chip
buffer and `200e` per activation element moved to or from DRAM, with
`e = 52.8 pJ`. Assumptions, stated in every note: each weight is read once per inference
(weight accesses = parameters), and a layer reads its input activation from DRAM and
writes its output there once (DRAM accesses = input + output elements). A model's
figure sums its weighted layers; pooling and elementwise ops are not charged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tailor.cost_models.base import Estimate
from tailor.cost_models.macs import weighted_layers
from tailor.cost_models.memory import resolve_batch
from tailor.errors import DynamicShapeError, TargetError
from tailor.ir.model import Model
from tailor.targets.target import Target

__all__ = [
    "E_MAC_PJ",
    "WEIGHT_ACCESS_COST",
    "DRAM_ACCESS_COST",
    "RAPL_ROOT",
    "INA_ROOT",
    "analytic_energy_mj",
    "layer_energy",
    "model_energy",
    "power_model_energy",
    "measure_energy",
    "read_ina_power",
    "measure_energy_ina",
]

logger = logging.getLogger(__name__)

#: Energy of one MAC in the analytic model, in picojoules.
E_MAC_PJ = 52.8
#: Cost of one weight access and of one DRAM activation access, in MACs (Yang et al.).
WEIGHT_ACCESS_COST = 6.0
DRAM_ACCESS_COST = 200.0
RAPL_ROOT = Path("/sys/class/powercap")
INA_ROOT = Path("/sys/bus/i2c/drivers/ina3221x")
#: Rails that measure a Jetson's whole input power (TX2 / Nano); the others nest in them.
_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
_ANALYTIC_NOTE = (
    "AdaDeep/Yang et al. (CVPR 2017): e*MACs + 6e*weights + 200e*DRAM activations, "
    "e = {e} pJ; each weight read once, input and output activations moved to DRAM once"
)
_TO_MS = {"ms": 1.0, "s": 1e3, "us": 1e-3}


# ---------------------------------------------------------------------- analytic
def analytic_energy_mj(
    macs: float, weight_accesses: float, activation_accesses: float, e_pj: float = E_MAC_PJ
) -> float:
    """`e * (MACs + 6 * weight accesses + 200 * DRAM activation accesses)` in mJ."""
    units = macs + WEIGHT_ACCESS_COST * weight_accesses + DRAM_ACCESS_COST * activation_accesses
    return units * e_pj * 1e-9


def _analytic_layers(model: Model, batch: int) -> dict[str, tuple[float, float, float]]:
    """`(MACs, weight accesses, activation accesses)` of every weighted layer."""
    model = resolve_batch(model, batch)
    out = {}
    for layer in weighted_layers(model):
        try:
            acts = sum(
                float(_elements(model.static_shape(t, batch=batch)))
                for t in (layer.data, layer.output)
            )
            out[layer.name] = (float(layer.macs(model, batch)), float(layer.params), acts)
        except DynamicShapeError as e:
            raise DynamicShapeError(f"cannot estimate the energy of {layer.name!r}: {e}") from e
    return out


def _elements(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------------- power model
def power_model_energy(latency: Estimate, target: Target) -> Estimate:
    """`latency * (power_active_w - power_idle_w)` of the target, in mJ.

    Args:
        latency: the time of one run, in `ms`, `s` or `us`, with its source.
        target: supplies the power figures (and their provenance for the note).

    Raises:
        ValueError: the latency is not a time.
    """
    if latency.unit not in _TO_MS:
        raise ValueError(f"latency must be in ms, s or us, not {latency.unit!r}")
    ms = latency.value * _TO_MS[latency.unit]
    watts = target.power_active_w - target.power_idle_w
    provenance = target.sources.get("power_active_w", "")
    note = (
        f"{ms:.4g} ms ({latency.source} latency) x ({target.power_active_w:g} W active - "
        f"{target.power_idle_w:g} W idle) of {target.name}"
    )
    if provenance:
        note += f"; active power: {provenance}"
    return Estimate(ms * watts, "mJ", "power-model", note)


# ---------------------------------------------------------------------- per layer, model
def layer_energy(
    model: Model,
    target: Target | None = None,
    latencies: Mapping[str, Estimate] | None = None,
    *,
    batch: int = 1,
) -> dict[str, Estimate]:
    """Energy of each weighted layer, keyed by node name.

    A layer with a latency in `latencies` gets the `power-model` figure (needs
    `target`); the others the `analytic` one.

    Raises:
        TargetError: latencies are given without a target.
    """
    latencies = latencies or {}
    if latencies and target is None:
        raise TargetError("energy from latency needs a target for its power figures")
    out = {}
    for name, counts in _analytic_layers(model, batch).items():
        if name in latencies:
            out[name] = power_model_energy(latencies[name], target)  # type: ignore[arg-type]
        else:
            out[name] = Estimate(
                analytic_energy_mj(*counts), "mJ", "analytic", _ANALYTIC_NOTE.format(e=E_MAC_PJ)
            )
    return out


def model_energy(
    model: Model,
    target: Target | None = None,
    latency: Estimate | None = None,
    *,
    both: bool = False,
    batch: int = 1,
) -> dict[str, Estimate]:
    """Energy of one inference of the whole model.

    Args:
        model: the model (shapes inferred if missing).
        target: the device; needed with `latency`.
        latency: the model's latency per run; when given, the result is the
            `power-model` figure, because energy follows time, not MACs.
        both: also return each figure under its own key.
        batch: samples per run, for the analytic counts.

    Returns:
        `{"energy_mj": ...}`: `power-model` with a latency, else `analytic`. With
        `both`, also `"energy_mj_analytic"` and (with a latency) `"energy_mj_power_model"`.

    Raises:
        TargetError: a latency is given without a target.
    """
    out: dict[str, Estimate] = {}
    if latency is not None:
        if target is None:
            raise TargetError("energy from latency needs a target for its power figures")
        out["energy_mj"] = power_model_energy(latency, target)
        if not both:
            return out
        out["energy_mj_power_model"] = out["energy_mj"]
    counts = _analytic_layers(model, batch)
    analytic = Estimate(
        sum(analytic_energy_mj(*c) for c in counts.values()),
        "mJ",
        "analytic",
        f"sum over {len(counts)} weighted layers; " + _ANALYTIC_NOTE.format(e=E_MAC_PJ),
    )
    out.setdefault("energy_mj", analytic)
    if both:
        out["energy_mj_analytic"] = analytic
    return out


# ---------------------------------------------------------------------- RAPL
@dataclass(frozen=True)
class _Zone:
    path: Path
    name: str
    max_range_uj: int | None


def _rapl_zones(root: Path, include_dram: bool) -> list[_Zone] | str:
    """The RAPL zones whose energies add up without overlap, or why there are none.

    Packages (`package-N`) plus, optionally, their `dram` subzones (DRAM is outside the
    package domain); core/uncore nest inside a package and are skipped; `psys` (the
    whole platform) is used only when there is no package zone.
    """
    if not root.is_dir():
        return f"no RAPL powercap interface at {root}"
    zones: dict[str, list[_Zone]] = {"package": [], "dram": [], "psys": []}
    for d in sorted(root.glob("intel-rapl:*")):
        try:
            name = (d / "name").read_text().strip()
        except OSError:
            continue
        kind = "package" if name.startswith("package") else name
        if kind not in zones or (kind == "dram" and not include_dram):
            continue
        try:
            top = int((d / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            top = None
        zones[kind].append(_Zone(d, name, top))
    chosen = zones["package"] + zones["dram"] if zones["package"] else zones["psys"]
    return chosen or f"no RAPL package zone under {root}"


def _read_uj(zone: _Zone) -> int:
    return int((zone.path / "energy_uj").read_text())


def measure_energy(
    fn: Callable[[], object],
    repeat: int = 10,
    *,
    root: str | Path = RAPL_ROOT,
    include_dram: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> Estimate | None:
    """Energy per call of `fn` on this host, from the RAPL counters, in mJ.

    The counters are read before the first call and after each one, so a counter that
    wraps (at `max_energy_range_uj`) between two reads is corrected. RAPL meters whole
    packages: idle power and other processes are included.

    Args:
        fn: runs one inference.
        repeat: calls to average over.
        root: the powercap folder (a fake tree in tests).
        include_dram: add the `dram` zones where the CPU has them.
        clock: the time source for the mean power in the note.

    Returns:
        The `measured` Estimate, or None (the reason logged) when RAPL is absent or its
        counters cannot be read (often root-only).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, not {repeat}")
    zones = _rapl_zones(Path(root), include_dram)
    if isinstance(zones, str):
        logger.warning("cannot measure energy: %s", zones)
        return None
    try:
        previous = [_read_uj(z) for z in zones]
    except (OSError, ValueError) as e:
        logger.warning("cannot measure energy: RAPL counters are not readable (%s)", e)
        return None
    total = 0
    start = clock()
    for _ in range(repeat):
        fn()
        try:
            current = [_read_uj(z) for z in zones]
        except (OSError, ValueError) as e:
            logger.warning("cannot measure energy: RAPL counter read failed (%s)", e)
            return None
        for z, before, after in zip(zones, previous, current, strict=True):
            delta = after - before
            if delta < 0:
                if z.max_range_uj is None:
                    logger.warning("cannot measure energy: %s wrapped, range unknown", z.name)
                    return None
                delta += z.max_range_uj
            total += delta
        previous = current
    seconds = clock() - start
    mj = total / 1e3 / repeat
    watts = f", {total / 1e6 / seconds:.1f} W mean" if seconds > 0 else ""
    names = "+".join(z.name for z in zones)
    note = f"RAPL {names}, {repeat} runs{watts}; whole package, idle and other processes included"
    return Estimate(mj, "mJ", "measured", note)


# ---------------------------------------------------------------------- Jetson INA3221
def read_ina_power(root: str | Path = INA_ROOT) -> dict[str, float]:
    """Power of each INA3221 rail in mW, keyed by rail name (`rail_name_N`, else the
    channel's path); empty when there is no such sensor.

    Reads `<root>/*/iio:device*/in_power<N>_input`.

    Raises:
        OSError, ValueError: a power file cannot be read or parsed.
    """
    out = {}
    for dev in sorted(Path(root).glob("*/iio:device*")):
        for f in sorted(dev.glob("in_power*_input")):
            channel = f.name[len("in_power") : -len("_input")]
            label = dev / f"rail_name_{channel}"
            name = (
                label.read_text().strip()
                if label.is_file()
                else f"{dev.parent.name}/power{channel}"
            )
            out[name] = float(f.read_text())
    return out


def measure_energy_ina(
    fn: Callable[[], object],
    repeat: int = 10,
    *,
    root: str | Path = INA_ROOT,
    rails: Sequence[str] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Estimate | None:
    """Energy per call of `fn` on a Jetson, from its INA3221 power rails, in mJ.

    Power is sampled before the first call and after each one and integrated by the
    trapezoid rule over `clock`; the rails average over their conversion time, so runs
    shorter than a few milliseconds should be batched into one `fn`.

    Args:
        fn: runs one inference.
        repeat: calls to average over.
        root: the ina3221x driver folder (a fake tree in tests).
        rails: rails to add up; default: the board's input rail (`VDD_IN`, `POM_5V_IN`)
            if present, else every rail.
        clock: the time source in seconds.

    Returns:
        The `measured` Estimate, or None (the reason logged) without readable rails.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, not {repeat}")

    def power() -> float:
        values = read_ina_power(root)
        return sum(values[r] for r in chosen)

    try:
        values = read_ina_power(root)
    except (OSError, ValueError) as e:
        logger.warning("cannot measure energy: INA rails are not readable (%s)", e)
        return None
    if not values:
        logger.warning("cannot measure energy: no INA3221 rails under %s", root)
        return None
    if rails is None:
        total = [r for r in _TOTAL_RAILS if r in values][:1]
        chosen = total or sorted(values)
    else:
        chosen = list(rails)
        missing = [r for r in chosen if r not in values]
        if missing:
            logger.warning("cannot measure energy: no rail %s (have %s)", missing, sorted(values))
            return None
    t_prev, p_prev = clock(), sum(values[r] for r in chosen)
    energy = 0.0  # mW * s = mJ
    try:
        for _ in range(repeat):
            fn()
            t, p = clock(), power()
            energy += (p + p_prev) / 2.0 * (t - t_prev)
            t_prev, p_prev = t, p
    except (OSError, ValueError, KeyError) as e:
        logger.warning("cannot measure energy: INA rail read failed (%s)", e)
        return None
    note = f"INA3221 {'+'.join(chosen)}, {repeat} runs, trapezoid over {repeat + 1} samples; board power, idle included"
    return Estimate(energy / repeat, "mJ", "measured", note)
