"""Removes nodes and initializers that no graph output depends on.

Graph inputs and outputs are never removed. With a `layers` selector only selected dead
nodes go; whatever the dead nodes left in place still read stays too. Tensors read from
inside subgraphs (If/Loop/Scan bodies) count as used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from tailor.ir.model import Constant, Model, Node, Tensor
from tailor.passes.base import Pass, PassContext, PassResult
from tailor.passes.registry import register

__all__ = ["EliminateDead", "live_nodes"]

logger = logging.getLogger(__name__)


def _reads(node: Node) -> Iterator[Tensor]:
    """Every tensor `node` reads, including those its subgraphs read from outer scopes."""
    yield from node.inputs
    for graph in node.subgraphs():
        for inner in graph.nodes:
            yield from _reads(inner)
        yield from graph.outputs


def live_nodes(model: Model, keep: list[Node] | None = None) -> set[int]:
    """Ids of the nodes the graph outputs (and the nodes in `keep`) depend on."""
    live: set[int] = set()
    stack: list[Tensor] = list(model.outputs)
    for node in keep or ():
        live.add(id(node))
        stack.extend(_reads(node))
    while stack:
        tensor = stack.pop()
        for producer in tensor.inputs:
            if id(producer) not in live:
                live.add(id(producer))
                stack.extend(_reads(producer))
    return live


def _initializers(model: Model) -> set[str]:
    return {name for name, t in model.tensors().items() if isinstance(t, Constant)}


@register
class EliminateDead(Pass):
    """Removes nodes and initializers that no graph output depends on.

    Never removes graph inputs or outputs; with a `layers` selector, only selected nodes.
    """

    name = "eliminate_dead"
    lossless = True

    def run(self, model: Model, context: PassContext) -> PassResult:
        inits = _initializers(model)
        live = live_nodes(model)
        kept = [n for n in model.nodes if id(n) not in live and not self.selects(model, n)]
        if kept:
            live = live_nodes(model, kept)
        dead = [n for n in model.nodes if id(n) not in live]
        changes = [f"removed dead {n.op} {n.name}" for n in dead]
        model.remove_nodes(dead)
        model.toposort()
        changes += [
            f"removed unused initializer {name}" for name in sorted(inits - _initializers(model))
        ]
        return PassResult(model, bool(changes), changes)
