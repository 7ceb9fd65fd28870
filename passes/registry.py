"""The pass registry: in-tree passes, plus third-party ones from the entry-point group
`tailor.passes` (each entry point names a `Pass` subclass)."""

from __future__ import annotations

import difflib
import logging
from importlib.metadata import entry_points

from tailor.errors import UnknownPassError
from tailor.passes.base import Pass

__all__ = ["register", "get_pass", "available_passes", "ENTRY_POINT_GROUP"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tailor.passes"

_REGISTRY: dict[str, type[Pass]] = {}
_plugins_loaded = False


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass under its (case-insensitive) `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
        raise TypeError(f"{cls!r} is not a Pass subclass with a name")
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
            logger.warning("ignoring third-party pass %s (%s): %s", ep.name, ep.value, e)


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes by canonical lower-case name, sorted."""
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    """The pass class called `name` (any case); UnknownPassError with suggestions."""
    passes = available_passes()
    cls = passes.get(name.strip().lower())
    if cls is None:
        close = difflib.get_close_matches(name.lower(), list(passes), n=3, cutoff=0.5)
        hint = (
            f"; did you mean {' or '.join(close)}?"
            if close
            else f"; known passes: {', '.join(passes)}"
        )
        raise UnknownPassError(f"unknown pass {name!r}{hint}")
    return cls
