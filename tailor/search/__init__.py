"""Search strategies of the pass scheduler: greedy, evolutionary (NSGA-II) and rl
(AdaDeep's agents), over an abstract problem of units and options (see `base`)."""

from __future__ import annotations

from tailor.search.base import (
    STRATEGIES,
    Budget,
    Evaluation,
    Option,
    Problem,
    Scorer,
    SearchError,
    SearchResult,
    Unit,
    search,
)
from tailor.search.cache import CachedProblem

__all__ = [
    "STRATEGIES",
    "Budget",
    "CachedProblem",
    "Evaluation",
    "Option",
    "Problem",
    "Scorer",
    "SearchError",
    "SearchResult",
    "Unit",
    "search",
]
