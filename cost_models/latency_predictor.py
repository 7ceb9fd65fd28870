"""The learned latency model (after nn-Meter, MobiSys 2021): replaces "MACs are latency"
with a gradient-boosted regressor over kernel features, trained on the target's own
measurements.

Training, on models measured whole and kernel by kernel:

1. Each kernel (:mod:`.latency_kernels`) is regressed on its own, in log space, as a
   correction to an analytic prior (a call cost plus work at a rough rate plus bytes at
   a rough bandwidth, :data:`PRIOR`): latencies span four orders of magnitude, errors
   are relative, and trees learn an efficiency far better than an absolute time.
2. More trees are boosted on whole-model measurements: the loss is each model's summed
   kernels against its measured latency. Per-kernel times come from onnxruntime's
   profiler, whose own cost varies; whole-model times repeat within a few per cent.
3. A whole model is `scale * sum(kernels) + overhead`: `scale` and the per-model constant
   `overhead` are fitted by least relative error on out-of-fold predictions, the folds
   holding whole groups of models (an architecture, a compression setting), so the fit
   sees the errors of predicting models unlike the training ones.

The predictor is one JSON file: XGBoost's own JSON model embedded with the feature
names, the prior, the overhead fit and what it was trained on (never a pickle).
Predictors live in a cache folder keyed by the target's fingerprint, the onnxruntime
version and the thread count: a number measured with one runtime never predicts another.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tailor.cost_models.latency_features import FEATURE_NAMES, features
from tailor.cost_models.latency_kernels import Kernel
from tailor.cost_models.latency_measure import annotate
from tailor.errors import TailorError
from tailor.ir.model import Model

__all__ = [
    "LatencySample",
    "PredictedLatency",
    "LatencyPredictor",
    "default_cache_dir",
    "predictor_path",
]

logger = logging.getLogger(__name__)

FORMAT = "tailor-latency-predictor/1"
#: XGBoost settings: shallow trees, many small steps; chosen by cross-validation on the
#: training variants of benchmarks/cost_model.py (leaving out one setting at a time).
PARAMS: dict[str, Any] = {
    "objective": "reg:squarederror",
    "eta": 0.05,
    "max_depth": 4,
    "min_child_weight": 1.0,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "lambda": 1.0,
    "tree_method": "hist",
}
ROUNDS = 600
_FLOOR_US = 0.05  # below the profiler's resolution; keeps log() finite


@dataclass
class LatencySample:
    """One measured model, for training.

    Attributes:
        name: a label (the variant's name).
        kernels: its kernels.
        kernel_us: measured time of each kernel in microseconds (None: whole model only).
        total_ms: measured whole-model latency in milliseconds.
    """

    name: str
    kernels: list[Kernel]
    kernel_us: list[float] | None
    total_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kernels": [k.as_dict() for k in self.kernels],
            "kernel_us": self.kernel_us,
            "total_ms": self.total_ms,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencySample:
        return cls(
            str(data["name"]),
            [Kernel.from_dict(k) for k in data["kernels"]],
            None if data.get("kernel_us") is None else [float(v) for v in data["kernel_us"]],
            float(data["total_ms"]),
        )


@dataclass
class PredictedLatency:
    """A predicted whole-model latency and its parts, in milliseconds."""

    kernels: list[Kernel]
    kernel_ms: list[float]
    overhead_ms: float
    total_ms: float


def default_cache_dir() -> Path:
    """`$TAILOR_CACHE_DIR/latency`, else `$XDG_CACHE_HOME/tailor/latency`, else
    `~/.cache/tailor/latency`."""
    if os.environ.get("TAILOR_CACHE_DIR"):
        return Path(os.environ["TAILOR_CACHE_DIR"]).expanduser() / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tailor" / "latency"


def predictor_path(
    target: Any, *, threads: int = 1, cache_dir: str | os.PathLike | None = None
) -> Path:
    """`<cache_dir>/<target>/<fingerprint>/onnxruntime-<version>-t<threads>/predictor.json`.

    Args:
        target: a :class:`~tailor.targets.Target` or its name.
        cache_dir: the latency cache root (default :func:`default_cache_dir`).
    """
    import onnxruntime as ort

    from tailor.targets.target import get_target

    target = get_target(target)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / target.name / target.fingerprint() / f"onnxruntime-{ort.__version__}-t{threads}"
    return folder / "predictor.json"


def _matrix(ks: Sequence[Kernel]) -> np.ndarray:
    if not ks:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
    return np.asarray([features(k) for k in ks], dtype=np.float32)


#: The analytic prior the regressor corrects (in log space): a fixed call cost plus work
#: at a rough single-core rate and bytes at a rough bandwidth. Trees learn how far a
#: kernel falls from it (an efficiency) far better than its absolute time, which spans
#: four orders of magnitude and extrapolates badly to shapes between the training ones.
PRIOR = {"call_us": 1.0, "flops_per_us": 5e4, "int8_ops_per_us": 1e5, "bytes_per_us": 1e4}


def _column(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, FEATURE_NAMES.index(name)].astype(np.float64)


def _baseline_us(x: np.ndarray, prior: Mapping[str, float]) -> np.ndarray:
    """The prior time of each kernel (rows of a feature matrix), in microseconds."""
    weighted = _column(x, "kind_conv") + _column(x, "kind_gemm")
    ops = _column(x, "macs") * (1 + weighted)  # a MAC is two operations
    rate = np.where(_column(x, "int8") > 0, prior["int8_ops_per_us"], prior["flops_per_us"])
    data = _column(x, "activation_bytes") + _column(x, "weight_bytes")
    return prior["call_us"] + ops / rate + data / prior["bytes_per_us"]


def _train(x: np.ndarray, y: np.ndarray, w: np.ndarray, *, seed: int, threads: int) -> Any:
    import xgboost as xgb

    params = dict(PARAMS, seed=seed, nthread=threads)
    data = xgb.DMatrix(
        x,
        label=y,
        weight=w,
        base_margin=np.log(_baseline_us(x, PRIOR)),
        feature_names=list(FEATURE_NAMES),
    )
    return xgb.train(params, data, num_boost_round=ROUNDS)


#: Rounds of the second stage, which fits the kernel model to whole-model measurements:
#: grouped cross-validation on the training variants of benchmarks/cost_model.py (folds of
#: whole architectures and of whole settings) put 67.2 % within +-10 % at 400 rounds,
#: 65.6 % at 200 and 67.4 % at 800 (at twice the cost); max_depth 6 instead of 4: 66.9 %.
REFINE_ROUNDS = 400
REFINE_PARAMS: dict[str, Any] = {
    "eta": 0.1,
    "max_depth": 4,
    "min_child_weight": 0.0,
    "lambda": 0.01,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "tree_method": "hist",
}


def _refine(
    booster: Any,
    x: np.ndarray,
    groups: np.ndarray,
    totals_us: np.ndarray,
    *,
    seed: int,
    threads: int,
) -> Any:
    """Boosts more trees so that each model's kernels add up to its measured total.

    The per-kernel profile gives the first model (stage one) its shape, but profiled
    times carry the profiler's own, variable cost; whole-model times repeat within a few
    per cent. The loss is the squared log-ratio of a model's summed kernels to its
    measurement; each kernel's gradient is its model's log-ratio times its share of the
    sum (its Hessian, the share: a majorizer that keeps steps stable), so a leaf moves
    the kernels it holds by the mean relative error of their models.
    """
    import xgboost as xgb

    if REFINE_ROUNDS <= 0:
        return booster
    log_totals = np.log(totals_us)

    def objective(margin: np.ndarray, _: Any) -> tuple[np.ndarray, np.ndarray]:
        e = np.exp(margin.astype(np.float64))
        sums = np.bincount(groups, weights=e, minlength=len(totals_us))
        ratio = np.log(sums) - log_totals
        share = e / sums[groups]
        return 2 * ratio[groups] * share, 2 * share + 1e-12

    data = xgb.DMatrix(
        x, base_margin=np.log(_baseline_us(x, PRIOR)), feature_names=list(FEATURE_NAMES)
    )
    params = dict(REFINE_PARAMS, seed=seed, nthread=threads)
    return xgb.train(params, data, num_boost_round=REFINE_ROUNDS, obj=objective, xgb_model=booster)


def _predict_us(booster: Any, x: np.ndarray, prior: Mapping[str, float]) -> np.ndarray:
    if len(x) == 0:
        return np.zeros(0)
    margin = booster.inplace_predict(x, base_margin=np.log(_baseline_us(x, prior)))
    return np.exp(margin.astype(np.float64))


def _weights(samples: Sequence[LatencySample]) -> np.ndarray:
    """Each kernel weighs by its share of its model's time, plus an even share, so one
    model with many kernels does not dominate and big kernels are learned best."""
    out = []
    for s in samples:
        us = np.maximum(np.asarray(s.kernel_us, dtype=np.float64), _FLOOR_US)
        n = len(us)
        out.append(0.5 / n + 0.5 * us / us.sum())
    return np.concatenate(out) if out else np.zeros(0)


def _fit_overhead(sums_us: np.ndarray, totals_us: np.ndarray) -> tuple[float, float]:
    """(scale, overhead_us) minimising the squared relative error of
    `scale * sum + overhead` against the measured totals."""
    a = np.stack([sums_us / totals_us, 1.0 / totals_us], axis=1)
    (scale, overhead), *_ = np.linalg.lstsq(a, np.ones_like(totals_us), rcond=None)
    if not (scale > 0 and math.isfinite(scale) and math.isfinite(overhead)):
        return 1.0, 0.0
    return float(scale), float(overhead)


class LatencyPredictor:
    """Predicts per-kernel and whole-model latency from kernel features.

    Build one with :meth:`fit`, keep it with :meth:`save`, read it with :meth:`load`.
    """

    def __init__(
        self,
        booster: Any,
        *,
        scale: float,
        overhead_us: float,
        meta: Mapping[str, Any],
        prior: Mapping[str, float] | None = None,
    ):
        self.booster = booster
        self.scale = scale
        self.overhead_us = overhead_us
        self.meta: dict[str, Any] = dict(meta)
        self.prior = dict(prior or PRIOR)

    @classmethod
    def fit(
        cls,
        samples: Sequence[LatencySample],
        *,
        meta: Mapping[str, Any] | None = None,
        folds: int = 5,
        groups: Sequence[str] | None = None,
        seed: int = 0,
        threads: int = 1,
    ) -> LatencyPredictor:
        """Trains on measured samples (those without per-kernel times are left out).

        Kernels must carry `runtime_ops` as the prediction will see them
        (:func:`~.latency_measure.annotate`, or a profile from this machine).

        Args:
            samples: measured models.
            meta: what the measurements are of (target, onnxruntime version, threads),
                stored with the predictor.
            folds: folds of out-of-fold kernel predictions for the overhead fit.
            groups: a label per sample (its architecture, its compression setting); a
                fold holds whole groups, so the overhead fit sees the errors of
                predicting models unlike any trained on, as new models will be.
            seed: XGBoost's and the fold assignment's seed.
            threads: XGBoost threads.

        Raises:
            TailorError: no sample has per-kernel times.
        """
        timed = [s for s in samples if s.kernel_us is not None and s.kernels]
        if not timed:
            raise TailorError("no sample has per-kernel times to train a latency predictor on")
        x = [_matrix(s.kernels) for s in timed]
        y = [np.log(np.maximum(np.asarray(s.kernel_us), _FLOOR_US)) for s in timed]
        w = _weights(timed)
        offsets = np.cumsum([0] + [len(v) for v in y])
        rng = np.random.default_rng(seed)
        if groups is not None:
            label = {id(s): g for s, g in zip(samples, groups, strict=True)}
            names = sorted({label[id(s)] for s in timed})
            order = {g: i for i, g in enumerate(rng.permutation(names))}
            fold_of = np.asarray([order[label[id(s)]] for s in timed]) % max(
                2, min(folds, len(names))
            )
        else:
            fold_of = rng.permutation(len(timed)) % max(2, min(folds, len(timed)))
        sums = np.zeros(len(timed))
        totals = np.asarray([s.total_ms * 1e3 for s in timed])

        def booster_for(chosen: list[int]) -> Any:
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in chosen])
            xs = np.concatenate([x[i] for i in chosen])
            booster = _train(
                xs, np.concatenate([y[i] for i in chosen]), w[rows], seed=seed, threads=threads
            )
            groups = np.repeat(np.arange(len(chosen)), [len(x[i]) for i in chosen])
            return _refine(booster, xs, groups, totals[chosen], seed=seed, threads=threads)

        for f in np.unique(fold_of):
            train = [i for i in range(len(timed)) if fold_of[i] != f]
            if not train:
                continue
            booster = booster_for(train)
            for i in np.flatnonzero(fold_of == f):
                sums[i] = _predict_us(booster, x[i], PRIOR).sum()
        scale, overhead = _fit_overhead(sums, totals)
        booster = booster_for(list(range(len(timed))))
        info = dict(meta or {})
        info.update(
            samples=len(timed),
            kernels=int(offsets[-1]),
            out_of_fold_rmspe=float(
                np.sqrt(np.mean(((scale * sums + overhead) / totals - 1) ** 2))
            ),
        )
        logger.info(
            "latency predictor: %d kernels of %d models, scale %.3f, overhead %.1f us",
            offsets[-1],
            len(timed),
            scale,
            overhead,
        )
        return cls(booster, scale=scale, overhead_us=overhead, meta=info)

    def predict_kernels_us(self, found: Sequence[Kernel]) -> np.ndarray:
        """Each kernel's predicted time in microseconds (before the whole-model scale)."""
        return _predict_us(self.booster, _matrix(found), self.prior)

    def predict(self, models: Sequence[Model | Sequence[Kernel]]) -> list[PredictedLatency]:
        """Predicted latency of each model: a :class:`Model` (its kernels are annotated with
        what onnxruntime on this machine runs, see
        :func:`~.latency_measure.annotate`) or its kernels, annotated the same way."""
        out = []
        for item in models:
            found = annotate(item) if isinstance(item, Model) else list(item)
            us = self.predict_kernels_us(found) * self.scale
            kernel_ms = [float(v) / 1e3 for v in us]
            overhead_ms = self.overhead_us / 1e3
            out.append(
                PredictedLatency(found, kernel_ms, overhead_ms, sum(kernel_ms) + overhead_ms)
            )
        return out

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """Plain data: the format tag, features, overhead fit, meta and XGBoost's JSON."""
        return {
            "format": FORMAT,
            "features": list(FEATURE_NAMES),
            "scale": self.scale,
            "overhead_us": self.overhead_us,
            "prior": self.prior,
            "params": dict(PARAMS, rounds=ROUNDS),
            "refine_params": dict(REFINE_PARAMS, rounds=REFINE_ROUNDS),
            "meta": self.meta,
            "booster": json.loads(bytes(self.booster.save_raw("json"))),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the predictor as JSON, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict()) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyPredictor:
        """Reads a predictor written by :meth:`save`.

        Raises:
            TailorError: the file is missing, not a predictor, or from another feature set.
        """
        import xgboost as xgb

        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise TailorError(f"cannot read latency predictor {path}: {e}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TailorError(f"{path} is not a tailor latency predictor ({FORMAT})")
        if data.get("features") != list(FEATURE_NAMES):
            raise TailorError(
                f"latency predictor {path} was trained on other kernel features; train it again"
            )
        booster = xgb.Booster()
        booster.load_model(bytearray(json.dumps(data["booster"]).encode()))
        return cls(
            booster,
            scale=float(data["scale"]),
            overhead_us=float(data["overhead_us"]),
            meta=data.get("meta", {}),
            prior=data.get("prior"),
        )

    def __repr__(self) -> str:
        return (
            f"LatencyPredictor({self.meta.get('samples', '?')} models, "
            f"scale {self.scale:.3f}, overhead {self.overhead_us:.1f} us)"
        )
