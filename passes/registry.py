"""The pass registry: in-tree passes, plus third-party ones from the entry-point group
`tailor.passes` (each entry point names a `Pass` subclass)."""

from __future__ import annotations

import difflib
import logging
from importlib.metadata import entry_points

from tailor.errors import UnknownPassError
from tailor.passes.base import Pass
from tailor.passes.pipeline import _NAME

__all__ = ["register", "get_pass", "available_passes", "ENTRY_POINT_GROUP"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tailor.passes"

_REGISTRY: dict[str, type[Pass]] = {}
_plugins_loaded = False
# Entry points that failed to load, by lower-case name: the reason, for get_pass's error.
_BROKEN: dict[str, str] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass under its (case-insensitive) `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
        raise TypeError(f"{cls!r} is not a Pass subclass with a name")
    if not _NAME.fullmatch(cls.name):
        # A name the pipeline text cannot spell would register a pass nobody can run.
        raise TypeError(
            f"pass name {cls.name!r} is not a valid pipeline name (letters, digits, _ . -)"
        )
    key = cls.name.lower()
    existing = _REGISTRY.get(key)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"pass name {cls.name!r} is already taken by {existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[key] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            register(cls)
        except Exception as e:  # one broken plugin must not take tailor down
            reason = f"{type(e).__name__}: {e}"
            logger.warning("ignoring third-party pass %s (%s): %s", ep.name, ep.value, reason)
            _BROKEN[ep.name.lower()] = f"{ep.name} = {ep.value} ({reason})"


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes by canonical lower-case name, sorted."""
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    """The pass class called `name` (any case); UnknownPassError with suggestions."""
    passes = available_passes()
    key = name.strip().lower()
    cls = passes.get(key)
    if cls is None and key in _BROKEN:
        raise UnknownPassError(
            f"pass {name!r} comes from a third-party entry point that failed to load: {_BROKEN[key]}"
        )
    if cls is None:
        close = difflib.get_close_matches(key, list(passes), n=3, cutoff=0.5)
        hint = (
            f"; did you mean {' or '.join(close)}?"
            if close
            else f"; known passes: {', '.join(passes)}"
        )
        raise UnknownPassError(f"unknown pass {name!r}{hint}")
    return cls
