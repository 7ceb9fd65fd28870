"""Local rewrites as rules: replaces hand-written graph walks with `(match, rewrite)` rules
that one generic pass applies until nothing matches.

A :class:`Rule` names the op types it anchors on, a `match` that returns a
:class:`Match` or, when it does not apply, the reason as a string (data, not an
exception), and a `rewrite` that edits the model and returns one line describing the
change. :func:`apply_rules` runs a rule set over the nodes a pass selects, to a fixed
point; :class:`RewritePass` wraps that into a registered pass.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tailor.ir.model import Model, Node, Tensor, Variable
from tailor.passes.base import Pass, PassContext, PassResult

__all__ = [
    "Match",
    "Rule",
    "RewriteOutcome",
    "RewritePass",
    "apply_rules",
    "refresh_shapes",
    "sole_consumer",
]

logger = logging.getLogger(__name__)


@dataclass
class Match:
    """Where a rule applies: the anchor node and what the check found (so the rewrite
    does not recompute it)."""

    node: Node
    info: dict[str, Any] = field(default_factory=dict)


class Rule:
    """One local rewrite. Subclasses set `name` and `ops` and implement both methods.

    A rewrite must remove (``model.remove_nodes`` or ``model.bypass``) every node it
    replaces, so that a fixed point is reached; dead producers may be left to cleanup.
    """

    name: ClassVar[str] = ""
    #: anchor op types (the selector is checked on the anchor); empty: every node
    ops: ClassVar[tuple[str, ...]] = ()

    def match(self, model: Model, node: Node) -> Match | str:  # pragma: no cover - abstract
        raise NotImplementedError

    def rewrite(self, model: Model, match: Match) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class RewriteOutcome:
    """What :func:`apply_rules` did: change lines, matches per rule, and the reasons (per
    node and rule) why the rules did not apply in the final round."""

    changes: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    applied: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)


def apply_rules(
    model: Model,
    rules: Sequence[Rule],
    *,
    selects: Callable[[Node], bool] = lambda node: True,
    max_rounds: int | None = None,
) -> RewriteOutcome:
    """Applies `rules` to the selected nodes until no rule matches anywhere.

    Args:
        model: edited in place.
        rules: tried in order on each node; the first match is rewritten.
        selects: whether a node may serve as an anchor (a pass's `layers` selector).
        max_rounds: guard against a rule that keeps matching (a bug in the rule).
    """
    out = RewriteOutcome()
    limit = max_rounds if max_rounds is not None else len(model.nodes) + 10
    for _ in range(limit):
        out.skipped.clear()
        changed = False
        alive = {id(n) for n in model.nodes}
        for node in list(model.nodes):
            if id(node) not in alive or not selects(node):
                continue
            for rule in rules:
                if rule.ops and node.op not in rule.ops:
                    continue
                found = rule.match(model, node)
                if isinstance(found, str):
                    out.skipped.setdefault(node.name, {})[rule.name] = found
                    continue
                name = node.name
                line = rule.rewrite(model, found)
                logger.debug("%s: %s", rule.name, line)
                out.changes.append(line)
                out.counts[rule.name] += 1
                out.applied.setdefault(name, []).append(rule.name)
                out.skipped.pop(name, None)
                # New nodes are appended; keep the order topological for selectors by index.
                model.toposort()
                alive = {id(n) for n in model.nodes}
                changed = True
                break
        if not changed:
            return out
    raise RuntimeError(
        f"rules {[r.name for r in rules]} still match after {limit} rounds; a rule never converges"
    )


class RewritePass(Pass):
    """Base of passes that are a rule set: subclasses set `rule_types` (or override
    :meth:`rules`) and `needs_shapes` when their checks read tensor shapes."""

    rule_types: ClassVar[tuple[type[Rule], ...]] = ()
    needs_shapes: ClassVar[bool] = False

    def rules(self) -> list[Rule]:
        return [cls() for cls in self.rule_types]

    def run(self, model: Model, context: PassContext) -> PassResult:
        if self.needs_shapes:
            refresh_shapes(model)
        out = apply_rules(model, self.rules(), selects=lambda node: self.selects(model, node))
        model.cleanup()
        notes: dict[str, dict[str, Any]] = {n: {"applied": r} for n, r in out.applied.items()}
        for n, reasons in out.skipped.items():
            notes.setdefault(n, {})["skipped"] = reasons
        logger.info("%s: %d rewrites %s", self.name, len(out.changes), dict(out.counts))
        return PassResult(model, bool(out.changes), out.changes, notes)


# ---------------------------------------------------------------------- helpers for rules
def refresh_shapes(model: Model) -> Model:
    """Re-infers every intermediate shape: an earlier pass may have left stale ones."""
    for t in model.tensors().values():
        if isinstance(t, Variable) and not model.is_graph_input(t) and not model.is_graph_output(t):
            t.shape = None
    return model.infer_shapes()


def sole_consumer(model: Model, tensor: Tensor) -> Node | str:
    """The only node reading `tensor` (once), or why there is none."""
    if model.is_graph_output(tensor):
        return f"{tensor.name} is a graph output"
    readers = model.consumers(tensor)
    if len(readers) != 1:
        return f"{tensor.name} has {len(readers)} consumers"
    if sum(t is tensor for t in readers[0].inputs) != 1:
        return f"{readers[0].name} reads {tensor.name} more than once"
    return readers[0]
