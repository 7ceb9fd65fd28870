"""Pipeline text: `fuse,prune_channels(ratio=0.3,layers=conv*),svd(rank=0.25)`.

Grammar:
    pipeline := call (',' call)*
    call     := NAME ['(' [arg (',' arg)*] ')']
    arg      := KEY '=' VALUE
    VALUE    := bare text without , ( ) = ' " and spaces  |  '...' or "..." (backslash escapes)
The parser builds a syntax tree (:class:`Pipeline`) that prints back to the same text;
:class:`~tailor.passes.manager.PassManager` turns it into typed, validated passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tailor.errors import PipelineSyntaxError
from tailor.passes.base import format_value

__all__ = ["PassCall", "Pipeline", "parse_pipeline"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_BARE = re.compile(r"[^,()='\"\s]+")


@dataclass(frozen=True)
class PassCall:
    """One pass in pipeline text, with its arguments as written (untyped)."""

    name: str
    args: tuple[tuple[str, str], ...] = ()

    def to_text(self) -> str:
        if not self.args:
            return self.name
        return f"{self.name}({','.join(f'{k}={format_value(v)}' for k, v in self.args)})"


@dataclass(frozen=True)
class Pipeline:
    """The syntax tree of a pipeline: an ordered tuple of pass calls."""

    calls: tuple[PassCall, ...]

    def to_text(self) -> str:
        return ",".join(c.to_text() for c in self.calls)

    def __str__(self) -> str:
        return self.to_text()


def parse_pipeline(text: str) -> Pipeline:
    """Parses pipeline text; raises PipelineSyntaxError pointing at the column."""
    return _Parser(text).pipeline()


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, what: str) -> PipelineSyntaxError:
        return PipelineSyntaxError(f"bad pipeline {self.text!r}: {what} at column {self.pos + 1}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {ch!r}, found {found}")
        self.pos += 1

    def name(self, what: str) -> str:
        self.skip_ws()
        m = _NAME.match(self.text, self.pos)
        if not m:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of text"
            raise self.error(f"expected a {what}, found {found}")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> str:
        ch = self.peek()
        if ch in ("'", '"'):
            quote, self.pos, out = ch, self.pos + 1, []
            while self.pos < len(self.text):
                c = self.text[self.pos]
                if c == "\\" and self.pos + 1 < len(self.text):
                    out.append(self.text[self.pos + 1])
                    self.pos += 2
                    continue
                if c == quote:
                    self.pos += 1
                    return "".join(out)
                out.append(c)
                self.pos += 1
            raise self.error("unterminated quoted value")
        m = _BARE.match(self.text, self.pos)
        if not m:
            raise self.error("expected a value")
        self.pos = m.end()
        return m.group(0)

    def call(self) -> PassCall:
        name = self.name("pass name")
        args: list[tuple[str, str]] = []
        if self.peek() == "(":
            self.pos += 1
            if self.peek() != ")":
                while True:
                    key = self.name("parameter name")
                    if any(k == key for k, _ in args):
                        raise self.error(f"parameter {key!r} given twice")
                    self.expect("=")
                    args.append((key, self.value()))
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    break
            self.expect(")")
        return PassCall(name, tuple(args))

    def pipeline(self) -> Pipeline:
        if not self.text.strip():
            raise PipelineSyntaxError(
                "the pipeline is empty; name at least one pass (see `tailor passes`)"
            )
        calls = [self.call()]
        while self.peek() == ",":
            self.pos += 1
            calls.append(self.call())
        if self.peek():
            raise self.error(f"unexpected {self.peek()!r}")
        return Pipeline(tuple(calls))
