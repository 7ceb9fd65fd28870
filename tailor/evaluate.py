"""Evaluators: how good a tailored model still is, as one number (higher is better).

Built in: top-1 accuracy on labelled inputs (`--labels FILE.npz`), and fidelity (top-1
agreement with the original model) when no labels exist. A user's own evaluator is
`module:function`, called with the path of a temporary `.onnx` file and returning a
float, so it may use any runtime and any data.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tailor.errors import EvaluatorError
from tailor.ir.model import Model
from tailor.ir.ort import make_session

__all__ = [
    "Evaluator",
    "TopOneAccuracy",
    "Fidelity",
    "UserEvaluator",
    "load_labels",
    "load_user_evaluator",
    "split_samples",
    "paired_standard_error",
]

logger = logging.getLogger(__name__)

_BATCH = 256


class Evaluator:
    """`evaluator(model) -> float`, higher is better; `name` says what it measures."""

    name = "score"

    def __call__(self, model: Model) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def per_sample(self, model: Model) -> np.ndarray | None:
        """Each sample's score (1.0 right, 0.0 wrong), whose mean is the score; None when
        the evaluator cannot tell (a user's function returns one number)."""
        return None


def paired_standard_error(baseline: np.ndarray, candidate: np.ndarray) -> float:
    """Standard error of the score change from `baseline` to `candidate`, two per-sample
    score vectors on the same samples: the paired (McNemar-style) error, which counts only
    the samples on which the two disagree. A candidate that changes few predictions has a
    small one however few samples there are; one that changes many, a large one.
    """
    d = np.asarray(candidate, np.float64) - np.asarray(baseline, np.float64)
    n = len(d)
    if n < 2:
        return 0.0
    return float(np.sqrt(max(float((d**2).mean() - d.mean() ** 2), 0.0) / n))


def _predict(model: Model, x: np.ndarray, input_name: str) -> np.ndarray:
    """Top-1 class of each sample from the model's first output, run as it will be
    deployed: with onnxruntime's graph optimizations. They change results where it
    matters — quantized QDQ pairs become integer kernels, and on x86 CPUs without VNNI
    their u8 x s8 products can saturate (a tucker2-then-int8 layer lost 23 points that
    the unfused graph did not show)."""
    sess = make_session(model, optimize=True)
    out = []
    for start in range(0, len(x), _BATCH):
        logits = sess.run(None, {input_name: x[start : start + _BATCH]})[0]
        logits = np.asarray(logits)
        out.append(logits.reshape(len(logits), -1).argmax(axis=1))
    return np.concatenate(out) if out else np.empty((0,), np.int64)


def _input_name(model: Model) -> str:
    if len(model.inputs) != 1:
        raise EvaluatorError(
            f"the built-in evaluators need a one-input model, this one has {len(model.inputs)}; "
            "pass your own with --eval module:function"
        )
    return model.inputs[0].name


@dataclass
class TopOneAccuracy(Evaluator):
    """Fraction of samples whose top-1 class (argmax of the first output) is the label."""

    x: np.ndarray
    y: np.ndarray
    name: str = "accuracy"

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise EvaluatorError(
                f"labels: {len(self.x)} inputs but {len(self.y)} labels; they must pair up"
            )
        if not len(self.x):
            raise EvaluatorError("labels: no samples to evaluate on")
        self.y = np.asarray(self.y).reshape(len(self.y), -1)
        if self.y.shape[1] > 1:  # one-hot labels
            self.y = self.y.argmax(axis=1)
        self.y = self.y.reshape(-1).astype(np.int64)

    def __call__(self, model: Model) -> float:
        return float(self.per_sample(model).mean())

    def per_sample(self, model: Model) -> np.ndarray:
        pred = _predict(model, self.x, _input_name(model))
        return (pred == self.y).astype(np.float64)


@dataclass
class Fidelity(Evaluator):
    """Fraction of samples on which the model's top-1 class is the original model's."""

    reference: Model
    x: np.ndarray
    name: str = "fidelity"

    def __post_init__(self) -> None:
        self._expected = _predict(self.reference, self.x, _input_name(self.reference))

    def __call__(self, model: Model) -> float:
        return float(self.per_sample(model).mean())

    def per_sample(self, model: Model) -> np.ndarray:
        pred = _predict(model, self.x, _input_name(model))
        return (pred == self._expected).astype(np.float64)


@dataclass
class UserEvaluator(Evaluator):
    """A user's `function(onnx_path) -> float`, loaded from `module:function`."""

    function: Callable[[str], float]
    spec: str
    name: str = "score"

    def __call__(self, model: Model) -> float:
        with tempfile.TemporaryDirectory(prefix="tailor-eval-") as tmp:
            path = Path(tmp) / "model.onnx"
            model.save(path)
            try:
                value = self.function(str(path))
            except Exception as e:
                raise EvaluatorError(
                    f"evaluator {self.spec} failed: {type(e).__name__}: {e}"
                ) from e
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise EvaluatorError(
                f"evaluator {self.spec} returned {type(value).__name__}, not a number"
            ) from None
        if not math.isfinite(value):
            raise EvaluatorError(f"evaluator {self.spec} returned {value}")
        return value


def load_user_evaluator(spec: str) -> UserEvaluator:
    """`module:function` or `path/to/file.py:function` -> evaluator.

    This imports the user's own code, named on the command line; nothing from a model
    file is ever executed.
    """
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise EvaluatorError(f"--eval {spec!r} is not module:function (or file.py:function)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise EvaluatorError(f"--eval {spec!r}: no such file {module_name}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # a build script's own module, next to it
            module = importlib.import_module(module_name)
    except EvaluatorError:
        raise
    except ImportError as e:
        raise EvaluatorError(f"--eval {spec!r}: cannot import {module_name}: {e}") from e
    except Exception as e:
        raise EvaluatorError(
            f"--eval {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}"
        ) from e
    function = getattr(module, func_name, None)
    if not callable(function):
        raise EvaluatorError(f"--eval {spec!r}: {module_name} has no function {func_name!r}")
    return UserEvaluator(function, spec)


def load_labels(spec: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels from `FILE.npz[:INPUTS,LABELS]`.

    Without names, the pair is `x`/`y`, `test_x`/`test_y` or `inputs`/`labels`, whichever
    the file holds. Pickled object arrays are refused.
    """
    text = os.fspath(spec)
    names: tuple[str, str] | None = None
    if ":" in text and not Path(text).is_file():
        text, _, tail = text.rpartition(":")
        parts = [p.strip() for p in tail.split(",")]
        if len(parts) != 2 or not all(parts):
            raise EvaluatorError(f"--labels {spec!r}: give FILE.npz:INPUTS,LABELS")
        names = (parts[0], parts[1])
    path = Path(text)
    if not path.is_file():
        raise EvaluatorError(f"--labels: no such file {text}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if names is None:
                for pair in (("x", "y"), ("test_x", "test_y"), ("inputs", "labels")):
                    if set(pair) <= set(keys):
                        names = pair
                        break
            if names is None:
                raise EvaluatorError(
                    f"--labels {text}: holds {', '.join(keys) or 'nothing'}; name the arrays as "
                    "FILE.npz:INPUTS,LABELS"
                )
            missing = [n for n in names if n not in keys]
            if missing:
                raise EvaluatorError(
                    f"--labels {text}: no array {missing[0]!r} (has {', '.join(keys)})"
                )
            x, y = f[names[0]], f[names[1]]
    except EvaluatorError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise EvaluatorError(f"--labels {text}: not a readable .npz ({e})") from e
    return x, y


def split_samples(
    arrays: Mapping[str, np.ndarray] | tuple[np.ndarray, ...], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded split: (search part, held-out part) with `fraction` held out."""
    n = len(next(iter(arrays.values())) if isinstance(arrays, Mapping) else arrays[0])
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, int(round(n * fraction))) if n > 1 else 0
    return np.sort(order[held:]), np.sort(order[:held])
