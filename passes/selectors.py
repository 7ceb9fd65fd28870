"""Layer selectors: which nodes a pass may touch.

Syntax (terms joined by `|`; a term starting with `!` excludes):
    `conv*`        glob on the node name (fnmatch, case-sensitive)
    `op:Conv`      op type (case-insensitive; globs allowed: `op:Conv*`)
    `#3`, `#2-5`, `#4-`   positions among the model's layers (Conv, ConvTranspose, Gemm,
                   MatMul with a constant weight), in topological order, 0-based, inclusive
    `*`            everything (the default)
A node is selected when it matches at least one including term (or there are only
excluding terms) and no excluding term.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass

from tailor.errors import ParameterError

__all__ = ["Selector"]

_RANGE = re.compile(r"^#(\d+)(?:(-)(\d*))?$")


@dataclass(frozen=True)
class _Term:
    kind: str  # "name" | "op" | "range"
    pattern: str = ""
    lo: int = 0
    hi: int | None = None
    negate: bool = False

    def matches(self, node, index: int | None) -> bool:
        if self.kind == "name":
            return fnmatch.fnmatchcase(node.name or "", self.pattern)
        if self.kind == "op":
            return fnmatch.fnmatchcase(node.op.lower(), self.pattern.lower())
        if index is None:
            return False
        return index >= self.lo and (self.hi is None or index <= self.hi)


@dataclass(frozen=True)
class Selector:
    """A parsed selector; see the module docstring for the syntax."""

    text: str
    terms: tuple[_Term, ...]

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def parse(text: str) -> Selector:
        """Parses selector text; raises ParameterError naming the bad term."""
        terms = []
        for raw in text.split("|"):
            term = raw.strip()
            negate = term.startswith("!")
            term = term[1:].strip() if negate else term
            if not term:
                raise ParameterError(f"layer selector {text!r} has an empty term")
            if term.startswith("#"):
                m = _RANGE.match(term)
                if not m:
                    raise ParameterError(f"layer selector term {term!r} is not #i, #i-j or #i-")
                lo = int(m.group(1))
                hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
                if hi is not None and hi < lo:
                    raise ParameterError(
                        f"layer selector range {term!r} is empty (end before start)"
                    )
                terms.append(_Term("range", lo=lo, hi=hi, negate=negate))
            elif term.lower().startswith("op:"):
                op = term[3:].strip()
                if not op:
                    raise ParameterError(f"layer selector term {term!r} names no op type")
                terms.append(_Term("op", pattern=op, negate=negate))
            else:
                terms.append(_Term("name", pattern=term, negate=negate))
        return Selector(text, tuple(terms))

    @property
    def selects_all(self) -> bool:
        return all(t.kind == "name" and t.pattern == "*" and not t.negate for t in self.terms)

    def matches(self, model, node) -> bool:
        """Whether `node` of `model` is selected."""
        index = None
        if any(t.kind == "range" for t in self.terms):
            index = _layer_index(model, node)
        includes = [t for t in self.terms if not t.negate]
        excludes = [t for t in self.terms if t.negate]
        if includes and not any(t.matches(node, index) for t in includes):
            return False
        return not any(t.matches(node, index) for t in excludes)


def _layer_index(model, node) -> int | None:
    from tailor.ir.layers import is_layer_node

    i = 0
    for n in model.nodes:
        if is_layer_node(model, n):
            if n is node:
                return i
            i += 1
    return None
