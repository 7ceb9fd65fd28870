"""Resumable search state: every evaluation, one JSON line, written as it arrives.

:class:`CachedProblem` wraps a problem. Each evaluation it makes is appended to a JSONL
file and flushed to disk (fsync) before it is returned, so a search killed at any moment
(even `kill -9`, which can leave half a line) loses at most the candidates in flight. On
start it loads the file and answers those assignments from it without calling the
wrapped problem. The strategies are seeded and deterministic, so a restarted search asks
for the same candidates, gets the cached ones at once, and goes on where it stopped.

The first line is a header with a key the caller derives from whatever determines the
answers (model hash, target, demands, space, evaluator). A file with another key belongs
to another search: it is renamed to `<name>.old` and the search starts fresh.

Failed candidates are cached too (failures are data); delete the file, or change the
key, to retry them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from tailor.search.base import Evaluation, Problem, Unit

__all__ = ["CachedProblem", "STATE_VERSION"]

logger = logging.getLogger(__name__)

#: Bumped when the line format changes; an older file is then set aside like a new key.
STATE_VERSION = 1


class CachedProblem:
    """A problem whose evaluations persist in `path` (JSONL) and are replayed from it.

    Args:
        problem: the problem to wrap.
        path: the state file (created, with its folder).
        key: what determines the answers; a file with another key is set aside.

    Attributes:
        hits, misses: assignments answered from the file / by the wrapped problem.
    """

    def __init__(self, problem: Problem, path: str | os.PathLike, *, key: str = ""):
        self.problem = problem
        self.path = Path(path)
        self.key = str(key)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, ...], Evaluation] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._load()

    @property
    def units(self) -> list[Unit]:
        return self.problem.units

    @property
    def baseline(self) -> dict[str, float]:
        return self.problem.baseline

    @property
    def thread_safe(self) -> bool:
        return bool(getattr(self.problem, "thread_safe", False))

    @property
    def cached(self) -> int:
        """How many assignments the file holds."""
        return len(self._cache)

    def _header(self) -> str:
        return json.dumps({"tailor_search_state": STATE_VERSION, "key": self.key})

    def _load(self) -> None:
        if not self.path.exists():
            self._rewrite([])
            return
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        try:
            header = json.loads(lines[0])
            valid = (
                isinstance(header, dict)
                and header.get("tailor_search_state") == STATE_VERSION
                and header.get("key") == self.key
            )
        except ValueError:
            valid = False
        if not valid:
            old = self.path.with_name(self.path.name + ".old")
            os.replace(self.path, old)
            logger.warning(
                "search state %s belongs to another search (key or format differs); "
                "moved to %s and starting fresh",
                self.path,
                old.name,
            )
            self._rewrite([])
            return
        kept: list[bytes] = []
        dropped = 0
        n_units = len(self.units)
        body = lines[1:]
        for i, line in enumerate(body):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                assignment = tuple(int(c) for c in record["a"])
                if len(assignment) != n_units:
                    raise ValueError("assignment length")
                metrics = record.get("m")
                evaluation = Evaluation(
                    None if metrics is None else {k: float(v) for k, v in metrics.items()},
                    record.get("e"),
                    float(record.get("s", 0.0)),
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                dropped += 1
                # A kill -9 leaves the last line cut short; anything else is damage.
                if i != len(body) - 1:
                    logger.warning("search state %s: skipping damaged line %d", self.path, i + 2)
                continue
            self._cache[assignment] = evaluation
            kept.append(line)
        if dropped or not raw.endswith(b"\n"):
            # Appending after a cut line would glue two records together.
            self._rewrite(kept)
        logger.info("search state %s: %d evaluations to replay", self.path, len(self._cache))

    def _rewrite(self, lines: Sequence[bytes]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(self._header().encode() + b"\n")
            for line in lines:
                f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _append(self, records: Sequence[tuple[tuple[int, ...], Evaluation]]) -> None:
        text = "".join(
            json.dumps({"a": list(a), "m": ev.metrics, "e": ev.error, "s": ev.seconds}) + "\n"
            for a, ev in records
        )
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def evaluate(self, assignments: list[tuple[int, ...]]) -> list[Evaluation]:
        """Cached answers where the file has them; the wrapped problem for the rest,
        each written to the file before it is returned."""
        keys = [tuple(int(c) for c in a) for a in assignments]
        with self._lock:
            missing = list(dict.fromkeys(a for a in keys if a not in self._cache))
            self.hits += len(keys) - len(missing)
        if missing:
            fresh = list(self.problem.evaluate(missing))
            if len(fresh) != len(missing):
                raise RuntimeError(
                    f"the problem returned {len(fresh)} evaluations for {len(missing)} candidates"
                )
            with self._lock:
                self._append(list(zip(missing, fresh, strict=True)))
                self._cache.update(zip(missing, fresh, strict=True))
                self.misses += len(missing)
        with self._lock:
            return [self._cache[a] for a in keys]
