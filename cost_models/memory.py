"""Peak memory of one inference: weights plus the largest set of activations alive at
once (`source="exact"` under the execution model below).

Execution model: the nodes run one at a time in topological order (the model's stored
order where it is one); a node's inputs and outputs are alive while it runs; a tensor is
freed right after its last reader, graph outputs never; graph inputs are alive from the
start. No in-place reuse and no allocator padding or workspace is modelled, so a
runtime's own figure differs by those.

Weights: with `folded=True` (default), runtimes fold constant-only subgraphs when they
load a model (onnxruntime and TVM both do), so the decode subgraphs of the storage
passes cost their decoded float weights in memory, not their stored codes: the weights
are the constant-derived tensors that computing nodes read. With `folded=False` the
stored constants are the weights, and the decode subgraphs run at every inference, their
outputs counted as activations.

The execution order, the constant-derived tensors and static shapes computed here are
what the other cost models build on too.
"""

from __future__ import annotations

import heapq
import logging
import math

import numpy as np

from tailor.cost_models.base import Estimate
from tailor.errors import DynamicShapeError, TailorError, UnsupportedModelError
from tailor.ir.model import Constant, Model, Node, Tensor, Variable

__all__ = [
    "peak_memory",
    "tensor_bytes",
    "topological_order",
    "constant_derived",
    "ensure_shapes",
    "resolve_batch",
    "is_empty",
]

logger = logging.getLogger(__name__)


def tensor_bytes(model: Model, t: Tensor, batch: int = 1) -> int:
    """Bytes of a tensor: a constant's value, or a variable's inferred shape (symbolic
    leading dim set to `batch`) times its element size.

    Raises:
        DynamicShapeError: the shape is not static or the type is unknown.
    """
    if isinstance(t, Constant):
        return int(np.asarray(t.values).nbytes)
    value = model.constant_value(t)
    if value is not None:
        return int(value.nbytes)
    if t.dtype is None:
        raise DynamicShapeError(f"tensor {t.name!r} has no inferred type")
    return math.prod(model.static_shape(t, batch=batch)) * np.dtype(t.dtype).itemsize


def peak_memory(model: Model, batch: int = 1, *, folded: bool = True) -> dict[str, Estimate]:
    """Weights bytes plus the peak of live activation bytes over one inference.

    Args:
        model: the model; shapes are inferred if missing.
        batch: samples per run; replaces a symbolic leading (batch) dimension.
        folded: constant-only subgraphs are folded at load (see the module docstring).

    Returns:
        `{"peak_memory_bytes", "weights_bytes", "activations_peak_bytes"}`, each an
        :class:`Estimate` in bytes (`source="exact"`); the notes name the node at which
        the activations peak (the first, if several tie).

    Raises:
        DynamicShapeError: an activation's shape is not static apart from the batch.
    """
    model = resolve_batch(model, batch)
    order = topological_order(model)
    derived = constant_derived(model, order)
    stored = {name for name, t in model.tensors().items() if isinstance(t, Constant)}
    stored |= {t.name for n in order if n.op == "Constant" for t in n.outputs}
    static = derived if folded else stored
    # Nodes that run at inference: with folding, only those computing from activations.
    running = [n for n in order if not all(t.name in static for t in _outputs(n))]

    weights: dict[str, Tensor] = {}
    for node in running:
        weights.update((t.name, t) for t in _inputs(node) if t.name in static)
    weights.update((t.name, t) for t in model.outputs if t.name in static)
    weight_bytes = sum(tensor_bytes(model, t, batch) for t in weights.values())

    end = len(running)
    last: dict[str, int] = {}
    for i, node in enumerate(running):
        for t in _inputs(node):
            last[t.name] = i
    for t in model.outputs:
        last[t.name] = end
    size: dict[str, int] = {}

    def nbytes(t: Tensor) -> int:
        if t.name not in size:
            try:
                size[t.name] = tensor_bytes(model, t, batch)
            except DynamicShapeError as e:
                raise DynamicShapeError(f"cannot count peak memory: {e}") from e
        return size[t.name]

    inputs = [t for t in model.inputs if t.name not in static]
    live = sum(nbytes(t) for t in inputs)
    peak, at = live, None
    live -= sum(nbytes(t) for t in inputs if t.name not in last)  # never read
    for i, node in enumerate(running):
        outs = [t for t in _outputs(node) if t.name not in static]
        live += sum(nbytes(t) for t in outs)
        if live > peak:
            peak, at = live, node
        done = [t for t in _inputs(node) if t.name not in static and last.get(t.name) == i]
        done += [t for t in outs if t.name not in last]  # written but never read
        live -= sum(nbytes(t) for t in {t.name: t for t in done}.values())

    where = "the graph inputs, before the first node" if at is None else f"{at.op} {at.name!r}"
    how = "constant subgraphs folded at load" if folded else "decode subgraphs run every inference"
    rule = f"batch {batch}, topological order, tensors freed after their last reader, {how}"
    return {
        "peak_memory_bytes": Estimate(
            float(weight_bytes + peak),
            "B",
            "exact",
            f"weights {weight_bytes:,} + activations {peak:,} at {where}; {rule}",
        ),
        "weights_bytes": Estimate(
            float(weight_bytes), "B", "exact", f"{len(weights)} constant tensors; {how}"
        ),
        "activations_peak_bytes": Estimate(float(peak), "B", "exact", f"peak at {where}; {rule}"),
    }


# ---------------------------------------------------------------------- execution order, shapes
def topological_order(model: Model) -> list[Node]:
    """The model's nodes in a topological order, keeping the stored order where it is one.

    The model is not modified (unlike :meth:`Model.toposort`).

    Raises:
        UnsupportedModelError: the graph has a cycle.
    """
    nodes = list(model.nodes)
    producer = {id(t): i for i, n in enumerate(nodes) for t in n.outputs}
    waiting = [0] * len(nodes)
    readers: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        deps = {producer[id(t)] for t in n.inputs if id(t) in producer}
        deps.discard(i)
        waiting[i] = len(deps)
        for d in deps:
            readers[d].append(i)
    # A min-heap of stored positions: a graph that is already sorted keeps its order.
    ready = [i for i in range(len(nodes)) if waiting[i] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise UnsupportedModelError(f"{model.source}: the graph has a cycle")
    return [nodes[i] for i in order]


def constant_derived(model: Model, order: list[Node] | None = None) -> set[str]:
    """Names of the tensors computed from constants only: initializers, Constant node
    outputs, and every output of a node whose inputs are all such tensors (the decode
    subgraphs of the storage passes, folded by runtimes at load time)."""
    derived = {name for name, t in model.tensors().items() if isinstance(t, Constant)}
    for node in order if order is not None else topological_order(model):
        inputs = [t for t in node.inputs if not is_empty(t)]
        if node.op == "Constant" and not inputs:
            derived.update(t.name for t in node.outputs)
        elif inputs and all(t.name in derived for t in inputs):
            derived.update(t.name for t in node.outputs if not is_empty(t))
    return derived


def ensure_shapes(model: Model) -> None:
    """Runs shape inference when a tensor some node reads or writes has no shape yet
    (passes may leave fresh tensors unannotated); it only records shapes."""
    missing = any(
        isinstance(t, Variable) and not is_empty(t) and t.shape is None
        for n in model.nodes
        for t in (*n.inputs, *n.outputs)
    )
    if missing:
        try:
            model.infer_shapes()
        except UnsupportedModelError as e:
            logger.info("shape inference failed, using the shapes the model has: %s", e)


def resolve_batch(model: Model, batch: int = 1) -> Model:
    """The model itself when every activation shape is static apart from a symbolic
    leading (batch) dim; otherwise a copy with static shapes (node names unchanged).

    The copy has the inputs' symbolic leading dims fixed to `batch` and shapes inferred
    again; a symbolic batch can leave later dims unknown (a channel shuffle's Reshape).
    Where ONNX shape inference still leaves some unknown, the copy is run once in
    onnxruntime on random inputs and the shapes it produced are recorded (data-dependent
    shapes then hold for those inputs only).
    """
    ensure_shapes(model)
    if not _dynamic(model):
        return model
    shapes = {}
    for t in model.inputs:
        shape = model.shape(t)
        if shape and not isinstance(shape[0], int):
            shapes[t.name] = [batch, *shape[1:]]
    if any(not isinstance(d, int) for s in shapes.values() for d in s):
        return model  # other symbolic input dims: only the user can fix them
    fixed = model.copy()
    try:
        if shapes:
            fixed.set_input_shapes(shapes)
        missing = _dynamic(fixed)
        if missing:
            _record_run_shapes(fixed, missing, batch)
    except TailorError as e:
        logger.info("cannot make the shapes of %s static: %s", model.source, e)
        return model
    return fixed


def _dynamic(model: Model) -> list[Tensor]:
    """Activations some node reads or writes whose shape is unknown or symbolic beyond
    the leading dim."""
    out: dict[str, Tensor] = {}
    for n in model.nodes:
        for t in (*n.inputs, *n.outputs):
            if not isinstance(t, Variable) or is_empty(t) or t.name in out:
                continue
            shape = model.shape(t)
            if shape is None or any(not isinstance(d, int) for d in shape[1:]):
                out[t.name] = t
    return list(out.values())


def _record_run_shapes(model: Model, tensors: list[Tensor], batch: int) -> None:
    """Sets the shapes and dtypes of `tensors` to what onnxruntime produces."""
    from tailor.ir.activations import capture
    from tailor.ir.ort import random_inputs

    seen: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    def keep(name: str, value: np.ndarray) -> np.ndarray:
        seen[name] = (value.shape, value.dtype)
        return np.empty((0,))

    feeds = random_inputs(model, batch=batch)
    capture(model, feeds, [t.name for t in tensors], batch_size=batch, reduce=keep)
    for t in tensors:
        if t.name in seen:
            shape, dtype = seen[t.name]
            t.shape, t.dtype = [int(d) for d in shape], dtype
    logger.info("%s: shapes of %d tensors taken from one onnxruntime run", model.source, len(seen))


def is_empty(t: Tensor) -> bool:
    """Whether `t` is an omitted optional input or output (a tensor without a name)."""
    return isinstance(t, Variable) and not t.name


def _inputs(node: Node) -> list[Tensor]:
    return list({t.name: t for t in node.inputs if not is_empty(t)}.values())


def _outputs(node: Node) -> list[Tensor]:
    return [t for t in node.outputs if not is_empty(t)]
