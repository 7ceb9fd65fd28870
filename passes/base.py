"""The pass contract: a typed parameter schema, `run(model, context) -> PassResult`.

One :class:`Param` declaration serves four uses: validation, CLI help, the plan file
and the scheduler's search range. Every pass also takes `layers`, a selector that
restricts where it applies (see :mod:`tailor.passes.selectors`).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from tailor.errors import ParameterError, PassError
from tailor.ir.model import Model

__all__ = ["Param", "Pass", "PassResult", "PassContext", "REQUIRED", "format_value"]

logger = logging.getLogger(__name__)

ParamKind = Literal["int", "float", "bool", "str", "choice", "rank", "selector"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """One parameter of a pass.

    Args:
        name: keyword used in pipeline text, plans and the API.
        kind: `int`, `float`, `bool`, `str`, `choice` (one of `choices`), `rank` (a
            fraction in (0, 1] or an integer >= 1) or `selector` (a layer selector).
        default: value when omitted; `REQUIRED` makes it mandatory.
        help: one line for `tailor passes` and plan comments.
        low, high: inclusive bounds for numbers.
        choices: allowed values for `choice`.
        search: the values or `(low, high)` range the scheduler explores; None: not searched.
    """

    name: str
    kind: ParamKind
    default: Any = REQUIRED
    help: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    search: tuple[Any, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def parse(self, text: str) -> Any:
        """Converts pipeline text into a typed value (then validated)."""
        raw = text.strip()
        try:
            if self.kind == "int":
                value: Any = int(raw)
            elif self.kind == "float":
                value = float(raw)
            elif self.kind == "bool":
                low = raw.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value = low in ("true", "1", "yes")
            elif self.kind == "rank":
                value = _parse_rank(raw)
            else:
                value = raw
        except ValueError as e:
            raise ParameterError(f"parameter {self.name}={raw!r} is not a valid {self.kind}") from e
        return self.validate(value)

    def validate(self, value: Any) -> Any:
        """Checks a typed value and returns it normalised; raises ParameterError."""
        kind, name = self.kind, self.name
        if kind == "bool":
            if not isinstance(value, (bool, np.bool_)):
                raise ParameterError(f"parameter {name} must be true or false, got {value!r}")
            return bool(value)
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ParameterError(f"parameter {name} must be an integer, got {value!r}")
            value = int(value)
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(
                value, (int, float, np.integer, np.floating)
            ):
                raise ParameterError(f"parameter {name} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ParameterError(f"parameter {name} must be finite, got {value!r}")
        elif kind == "rank":
            if isinstance(value, bool) or not isinstance(
                value, (int, float, np.integer, np.floating)
            ):
                raise ParameterError(
                    f"parameter {name} must be a fraction in (0, 1] or an integer rank, got {value!r}"
                )
            value = _normalise_rank(value, name)
        elif kind in ("str", "selector", "choice"):
            if kind == "choice" and isinstance(value, (int, float, np.integer, np.floating)):
                # Numeric choices (bits=4|8) come typed from the API, plans and search ranges.
                value = str(value)
            if not isinstance(value, str):
                raise ParameterError(f"parameter {name} must be a string, got {value!r}")
            if kind == "selector":
                from tailor.passes.selectors import Selector

                try:
                    Selector.parse(value)
                except ParameterError as e:
                    raise ParameterError(f"parameter {name}={value!r}: {e}") from e
            if kind == "choice":
                allowed = {str(c).lower(): c for c in self.choices or ()}
                if value.lower() not in allowed:
                    opts = ", ".join(map(str, self.choices or ()))
                    raise ParameterError(f"parameter {name}={value!r} is not one of: {opts}")
                value = allowed[value.lower()]
        if kind in ("int", "float") and value is not None:
            if self.low is not None and value < self.low:
                raise ParameterError(f"parameter {name}={value} is below its minimum {self.low}")
            if self.high is not None and value > self.high:
                raise ParameterError(f"parameter {name}={value} is above its maximum {self.high}")
        return value

    def describe(self) -> str:
        """One line for help screens: name, kind, default or range."""
        bits = [self.kind if self.kind != "choice" else "|".join(map(str, self.choices or ()))]
        if self.low is not None or self.high is not None:
            bits.append(f"in [{_fmt_bound(self.low, '-inf')}, {_fmt_bound(self.high, 'inf')}]")
        bits.append("required" if self.required else f"default {format_value(self.default)}")
        return f"{self.name} ({', '.join(bits)}): {self.help}"


def _fmt_bound(b: float | None, unbounded: str) -> str:
    return unbounded if b is None else format_value(b)


def _parse_rank(raw: str) -> float | int:
    if raw.endswith("%"):
        return float(raw[:-1]) / 100.0
    if any(c in raw for c in ".eE"):
        return float(raw)
    return int(raw)


def _normalise_rank(value: float | int, name: str) -> float | int:
    if isinstance(value, (int, np.integer)):
        if value < 1:
            raise ParameterError(f"parameter {name}={value}: an integer rank must be >= 1")
        return int(value)
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ParameterError(f"parameter {name}={value}: a fractional rank must be in (0, 1]")
    return value


def format_value(value: Any) -> str:
    """Canonical text of a parameter value in pipeline text (round-trips through parse)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    # Any whitespace (not only space, tab, newline) ends a bare value in the parser.
    if text == "" or any(c in ",()='\"" or c.isspace() for c in text):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


@dataclass
class PassResult:
    """What a pass did.

    Args:
        model: the rewritten model (may be the same object as the input).
        modified: whether anything changed.
        changes: human-readable lines, one per change ("folded bn1 into conv1").
        layer_notes: per-layer figures (reconstruction error, chosen rank, ...).
    """

    model: Model
    modified: bool
    changes: list[str] = field(default_factory=list)
    layer_notes: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes may need beyond the model, passed explicitly (never via globals).

    Args:
        calibration: named input arrays for data-driven passes, or None.
        seed: seed for anything random a pass does.
        check: post-condition checks the PassManager runs after each pass:
            `full` (onnx full check and, for lossless passes, numeric equivalence),
            `basic` (onnx checker only) or `none`.
        rtol, atol: tolerance for the equivalence check of lossless passes.
        progress: callback `(pass_name, index, total)` called before each pass.
    """

    calibration: Mapping[str, np.ndarray] | None = None
    seed: int = 0
    check: Literal["full", "basic", "none"] = "full"
    rtol: float = 1e-5
    atol: float = 1e-5
    progress: Callable[[str, int, int], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def require_calibration(self, pass_name: str) -> Mapping[str, np.ndarray]:
        """The calibration data, or a PassError saying how to provide it."""
        if not self.calibration:
            raise PassError(
                f"pass {pass_name} needs calibration data; pass --data FILE.npz "
                "(arrays named like the model's inputs) or calibration= in the API"
            )
        return self.calibration


_LAYERS = Param(
    "layers",
    "selector",
    "*",
    "which layers to apply to: globs on node names, op:TYPE, #i-j; '|' joins, '!' excludes",
)


class Pass:
    """Base of all passes.

    Subclasses set `name`, `params` and `lossless`, write a docstring whose first line
    says what they replace with what, and implement :meth:`run`. They are registered with
    :func:`tailor.passes.registry.register`.
    """

    name: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    lossless: ClassVar[bool] = False

    def __init__(self, **kwargs: Any):
        schema = self.schema()
        unknown = set(kwargs) - set(schema)
        if unknown:
            bad = sorted(unknown)[0]
            close = difflib.get_close_matches(bad.lower(), list(schema), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ParameterError(
                f"pass {self.name} has no parameter {bad!r}; {hint}(parameters: {', '.join(schema)})"
            )
        config: dict[str, Any] = {}
        for pname, param in schema.items():
            if pname in kwargs:
                value = kwargs[pname]
                try:
                    value = (
                        param.parse(value)
                        if isinstance(value, str)
                        and param.kind not in ("str", "selector", "choice")
                        else param.validate(value)
                    )
                except ParameterError as e:
                    raise ParameterError(f"pass {self.name}: {e}") from e
            elif param.required:
                raise ParameterError(f"pass {self.name} needs parameter {pname!r}: {param.help}")
            else:
                value = param.default
            config[pname] = value
        self.config = config

    @classmethod
    def schema(cls) -> dict[str, Param]:
        """Parameters by name, including the `layers` selector every pass takes."""
        out = {p.name: p for p in cls.params}
        out.setdefault("layers", _LAYERS)
        return out

    @classmethod
    def summary(cls) -> str:
        """First paragraph of the docstring, on one line."""
        doc = (cls.__doc__ or "").strip()
        return " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())

    def selects(self, model: Model, node) -> bool:
        """Whether `node` is inside this pass's `layers` selector."""
        from tailor.passes.selectors import Selector

        return Selector.parse(self.config["layers"]).matches(model, node)

    def run(self, model: Model, context: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_text(self) -> str:
        """Canonical pipeline text: the name plus non-default parameters in schema order."""
        args = [
            f"{k}={format_value(v)}"
            for k, v in self.config.items()
            if self.schema()[k].required or v != self.schema()[k].default
        ]
        return f"{self.name}({','.join(args)})" if args else self.name

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.config == self.config  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.to_text())

    def __repr__(self) -> str:
        return f"<pass {self.to_text()}>"
