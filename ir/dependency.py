"""The channel-dependency view: which output channels of which layers must be pruned
together, and what else (BatchNorm, residual adds, concats, squeeze-excite products,
Flatten into Gemm, splits, shuffles) follows them.

How it works: every output channel of a weighted layer is an *atom*. Each activation
tensor carries an integer array of atom ids, shaped like the tensor with size-1 axes
where the ids do not vary (so a Conv output is `[1, C, 1, 1]`). Nodes are walked in
topological order:

- a layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight) *consumes* the atoms
  on its input-channel axis and *produces* fresh atoms; a depthwise Conv passes its input
  atoms through (repeated by its channel multiplier);
- element-wise ops unify the atoms they combine position by position (a residual Add
  couples both branches; a squeeze-excite Mul couples the excitation with the trunk);
- data-movement ops (Reshape, Flatten, Transpose, Concat, Split, Slice, Gather, ...) are
  executed on the id arrays themselves with numpy, so concats, Flatten into Gemm and
  channel shuffles are followed exactly, whatever the layout;
- anything that mixes channels in a way channel removal cannot follow (an unknown op,
  a softmax over channels, a broadcast of one channel over many, a graph output, a graph
  input) *blocks* the atoms involved.

Atoms unified by element-wise ops form one coupled channel (a union-find class); classes
with the same producing and consuming layers form a :class:`ChannelGroup`. Pruning k
channels of a group removes k classes: for each producer the labelled output channels,
for each consumer the labelled input positions, and the same positions in every tensor
listed in `tensors`.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from tailor.errors import DynamicShapeError, TailorError
from tailor.ir.layers import layer_weight
from tailor.ir.model import Constant, Model, Node, Tensor, Variable
from tailor.ir.ort import make_session, random_inputs

__all__ = ["ChannelGroup", "DependencyGraph", "dependency_graph"]

logger = logging.getLogger(__name__)

UNUSED = 0  # atom 0 is never handed out, so labels can use it as a sentinel

_UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Gelu", "Softplus", "Softsign", "Mish", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Shrink", "Clip", "Identity",
    "Dropout", "Cast", "Relu6", "Not", "IsNaN", "IsInf", "QuantizeLinear", "DequantizeLinear",
    "Swish",
}  # fmt: skip
_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where", "Equal", "Greater",
    "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "Expand",
}  # fmt: skip
_PER_CHANNEL = {"BatchNormalization", "InstanceNormalization"}
_SPATIAL = {
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
    "Resize", "Upsample", "Pad", "MaxRoiPool",
}  # fmt: skip
_REDUCE = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
}  # fmt: skip
_RESHAPE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_NO_CHANNELS = {
    "Shape",
    "Size",
    "ConstantOfShape",
    "Range",
    "NonZero",
    "EyeLike",
    "RandomNormalLike",
}


@dataclass
class ChannelGroup:
    """Channels that must be pruned together.

    Every label array maps positions to the group's channel index (0..size-1), or -1 for
    positions outside the group.

    Attributes:
        id: index of the group in the model.
        size: number of coupled channels (what `ratio` is taken of).
        producers: layer name -> labels over its output channels.
        consumers: layer name -> labels over its input features (for a Gemm after a
            Flatten, one label repeats over every spatial position of its channel).
        carriers: other nodes the channels flow through (BatchNorm, activations, adds,
            depthwise convs, concats, reshapes): their parameters and shape constants
            must follow a pruning.
        tensors: tensor name -> labels, shaped like the tensor's id array.
        prunable: False when some channel reaches something channel removal cannot
            follow; `reasons` says what.
        blocks: pruning must remove the same number of channels from each of `blocks`
            equal contiguous slices (grouped convolutions).
    """

    id: int
    size: int
    producers: dict[str, np.ndarray]
    consumers: dict[str, np.ndarray]
    carriers: list[str]
    tensors: dict[str, np.ndarray] = field(repr=False)
    prunable: bool
    reasons: list[str]
    blocks: int = 1

    def describe(self) -> str:
        state = "prunable" if self.prunable else f"fixed ({'; '.join(self.reasons[:2])})"
        blocks = f", in {self.blocks} blocks" if self.blocks > 1 else ""
        return (
            f"group {self.id}: {self.size} channels{blocks}, produced by {', '.join(self.producers)}; "
            f"read by {', '.join(self.consumers) or 'nothing'}; {state}"
        )

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "size": self.size,
            "producers": sorted(self.producers),
            "consumers": sorted(self.consumers),
            "carriers": list(self.carriers),
            "prunable": self.prunable,
            "reasons": list(self.reasons),
            "blocks": self.blocks,
        }


@dataclass
class DependencyGraph:
    """All channel groups of a model, with lookups by layer."""

    groups: list[ChannelGroup]

    def produced_by(self, layer: str) -> list[ChannelGroup]:
        """The groups holding `layer`'s output channels."""
        return [g for g in self.groups if layer in g.producers]

    def consumed_by(self, layer: str) -> list[ChannelGroup]:
        """The groups feeding `layer`'s input channels."""
        return [g for g in self.groups if layer in g.consumers]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = [UNUSED]

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _minimal(ids: np.ndarray) -> np.ndarray:
    """Shrinks every axis along which the ids do not vary to size 1."""
    for axis in range(ids.ndim):
        if ids.shape[axis] > 1:
            first = np.take(ids, [0], axis=axis)
            if np.array_equal(np.broadcast_to(first, ids.shape), ids):
                ids = first
    return np.ascontiguousarray(ids)


class _Walker:
    def __init__(self, model: Model):
        self.model = model
        self.uf = _UnionFind()
        self.ids: dict[str, np.ndarray | None] = {}
        self.blocked: dict[int, str] = {}
        self.atom_blocks: dict[int, int] = {}
        self.producers: dict[str, np.ndarray] = {}
        self.consumers: dict[str, np.ndarray] = {}

    # -- helpers ---------------------------------------------------------------
    def shape(self, t: Tensor) -> tuple[int, ...] | None:
        try:
            return self.model.static_shape(t, batch=1)
        except DynamicShapeError:
            return None

    def get(self, t: Tensor) -> np.ndarray | None:
        if isinstance(t, Constant) or self.model.constant_value(t) is not None:
            return None
        return self.ids.get(t.name)

    def block(self, ids: np.ndarray | None, reason: str) -> None:
        if ids is None:
            return
        for a in np.unique(ids):
            self.blocked.setdefault(int(a), reason)

    def opaque(self, t: Tensor, reason: str) -> np.ndarray:
        """Fresh, fixed atoms for a tensor whose channels tailor cannot change."""
        shape = self.shape(t)
        rank = len(shape) if shape else 0
        if rank >= 2:
            ids = self.uf.add(shape[1]).reshape([1, shape[1]] + [1] * (rank - 2))  # type: ignore[index]
        else:
            ids = self.uf.add(1).reshape([1] * rank)
        self.block(ids, reason)
        return ids

    def set(self, t: Tensor, ids: np.ndarray | None) -> None:
        self.ids[t.name] = None if ids is None else _minimal(ids)

    def full(self, t: Tensor, ids: np.ndarray) -> np.ndarray:
        shape = self.shape(t)
        return np.broadcast_to(ids, shape) if shape is not None else ids

    def channels(self, ids: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray | None:
        """The atom of each position along `axis`, or None if it varies along other axes."""
        if ids.ndim != len(shape):
            return None
        full_axis = np.broadcast_to(
            ids, tuple(s if i == axis else ids.shape[i] for i, s in enumerate(shape))
        )
        moved = np.moveaxis(full_axis, axis, 0).reshape(shape[axis], -1)
        if moved.shape[1] > 1 and not (moved == moved[:, :1]).all():
            return None
        return moved[:, 0].copy()

    def block_node(self, node: Node, reason: str) -> None:
        for t in node.inputs:
            self.block(self.get(t), reason)
        for t in node.outputs:
            self.set(t, self.opaque(t, reason))

    # -- walk ------------------------------------------------------------------
    def walk(self) -> None:
        for t in self.model.inputs:
            self.set(t, self.opaque(t, f"fed by graph input {t.name!r}"))
        for node in self.model.nodes:
            try:
                self.visit(node)
            except (ValueError, IndexError) as e:  # a layout the numpy replay cannot follow
                logger.debug("dependency view: %s (%s) blocks: %s", node.name, node.op, e)
                self.block_node(node, f"{node.op} {node.name!r} has a layout tailor cannot follow")
        for t in self.model.outputs:
            self.block(self.ids.get(t.name), f"reaches graph output {t.name!r}")

    def visit(self, node: Node) -> None:
        op = node.op
        ins = [self.get(t) for t in node.inputs]
        if node.domain not in ("", "ai.onnx"):
            return self.block_node(node, f"{op} {node.name!r} from domain {node.domain!r}")
        if op in _NO_CHANNELS or all(i is None for i in ins):
            # Shapes, constants and index arithmetic carry no channels.
            for t in node.outputs:
                self.set(t, None)
            return None
        if any(self.shape(t) is None for t in node.inputs if self.get(t) is not None) or any(
            self.shape(t) is None
            for t in node.outputs
            if t.outputs or self.model.is_graph_output(t)
        ):
            return self.block_node(node, f"{op} {node.name!r} has tensors without a static shape")
        if layer_weight(self.model, node) is not None:
            return self.layer(node)
        if op in _UNARY or op in _ELEMENTWISE or op in _PER_CHANNEL:
            return self.elementwise(node)
        if op in _SPATIAL:
            return self.spatial(node)
        if op in _REDUCE or op in (
            "Softmax",
            "LogSoftmax",
            "Hardmax",
            "LayerNormalization",
            "LpNormalization",
        ):
            return self.reduce(node)
        if op in _RESHAPE or op == "Transpose":
            return self.move(node)
        if op == "Concat":
            return self.concat(node)
        if op in ("Split", "Slice", "Gather"):
            return self.select(node)
        return self.block_node(node, f"{op} {node.name!r} is not understood by the dependency view")

    def layer(self, node: Node) -> None:
        widx, w = layer_weight(self.model, node)  # type: ignore[misc]
        x = node.inputs[1 - widx] if node.op == "MatMul" else node.inputs[0]
        x_ids, x_shape = self.get(x), self.shape(x)
        out = node.outputs[0]
        out_rank = len(self.shape(out))  # type: ignore[arg-type]
        if node.op == "MatMul" and widx == 0:
            return self.block_node(node, f"MatMul {node.name!r} has its weight first")
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return self.block_node(node, f"Gemm {node.name!r} uses transA")
        axis = 1 if node.op in ("Conv", "ConvTranspose") else len(x_shape) - 1  # type: ignore[arg-type]
        chan = self.channels(x_ids, x_shape, axis) if x_ids is not None else None  # type: ignore[arg-type]
        if chan is None:
            self.block(x_ids, f"{node.op} {node.name!r} reads channels mixed with other axes")
            chan = np.zeros(x_shape[axis], np.int64)  # type: ignore[index]
        groups = int(node.attrs.get("group", 1))
        if node.op == "Conv":
            cout = w.shape[0]
        elif node.op == "ConvTranspose":
            cout = w.shape[1] * groups
        elif node.op == "Gemm":
            cout = w.shape[0] if node.attrs.get("transB", 0) else w.shape[1]
        else:
            cout = w.shape[-1]
        cin = len(chan)
        shape = [1] * out_rank
        shape[1 if node.op in ("Conv", "ConvTranspose") else out_rank - 1] = cout
        if (
            node.op in ("Conv", "ConvTranspose")
            and groups > 1
            and groups == cin
            and cout % cin == 0
        ):
            # Depthwise: output channel c*m+j reads input channel c only, so it carries c.
            self.set(out, np.repeat(chan, cout // cin).reshape(shape))
            return
        self.consumers[node.name] = chan
        atoms = self.uf.add(cout)
        self.producers[node.name] = atoms
        if groups > 1:
            for a in list(np.unique(chan)) + list(atoms):
                self.atom_blocks[int(a)] = math.lcm(self.atom_blocks.get(int(a), 1), groups)
        self.set(out, atoms.reshape(shape))

    def elementwise(self, node: Node) -> None:
        out = node.outputs[0]
        out_shape = self.shape(out)
        variables = []
        for t in node.inputs:
            ids = self.get(t)
            if ids is not None:
                variables.append((ids, self.shape(t)))
        if not variables:
            return self.set(out, None)
        rank = len(out_shape)  # type: ignore[arg-type]
        aligned = []
        for ids, shape in variables:
            pad = rank - ids.ndim
            aligned.append((ids.reshape((1,) * pad + ids.shape), (1,) * pad + tuple(shape)))  # type: ignore[arg-type]
        kept = []
        for i, (ids, shape) in enumerate(aligned):
            # An operand broadcast along an axis where another operand's atoms vary would
            # tie one channel to many: it cannot follow a pruning, so it is fixed instead.
            spread = any(
                shape[ax] == 1
                and out_shape[ax] > 1
                and any(o.shape[ax] > 1 for j, (o, _) in enumerate(aligned) if j != i)  # type: ignore[index]
                for ax in range(rank)
            )
            if spread:
                self.block(ids, f"{node.op} {node.name!r} broadcasts one channel over many")
            else:
                kept.append(ids)
        if not kept:
            return self.set(
                out, self.opaque(out, f"{node.op} {node.name!r} broadcasts one channel over many")
            )
        merged = np.broadcast_arrays(*kept)
        for other in merged[1:]:
            pairs = np.unique(np.stack([merged[0].ravel(), other.ravel()], 1), axis=0)
            for a, b in pairs:
                if a != b:
                    self.uf.union(int(a), int(b))
        self.set(out, merged[0])
        for extra in node.outputs[1:]:  # Dropout's mask, BatchNormalization's training outputs
            self.set(extra, None)

    def spatial(self, node: Node) -> None:
        x = node.inputs[0]
        ids, shape = self.get(x), self.shape(x)
        if node.op == "Pad":
            pads = self._pads(node)
            if pads is None or (
                len(shape) > 1
                and (pads[1] != 0 or pads[1 + len(shape)] != 0)
                or pads[0]
                or pads[len(shape)]
            ):  # type: ignore[arg-type]
                return self.block_node(node, f"Pad {node.name!r} pads the batch or channel axis")
        chan = self.channels(ids, shape, 1) if ids is not None and len(shape) > 1 else None  # type: ignore[arg-type]
        if chan is None:
            return self.block_node(node, f"{node.op} {node.name!r} mixes channels with other axes")
        for out in node.outputs[:1]:
            rank = len(self.shape(out))  # type: ignore[arg-type]
            self.set(out, chan.reshape([1, -1] + [1] * (rank - 2)))
        for extra in node.outputs[1:]:  # MaxPool indices
            self.set(extra, None)

    def _pads(self, node: Node) -> list[int] | None:
        if "pads" in node.attrs:
            return list(node.attrs["pads"])
        if len(node.inputs) > 1:
            value = self.model.constant_value(node.inputs[1])
            if value is None or (len(node.inputs) > 3 and node.inputs[3].name):
                return None
            return [int(v) for v in value]
        return None

    def reduce(self, node: Node) -> None:
        x, out = node.inputs[0], node.outputs[0]
        ids, shape = self.get(x), self.shape(x)
        rank = len(shape)  # type: ignore[arg-type]
        axes = self._axes(node, rank)
        if axes is None:
            return self.block_node(node, f"{node.op} {node.name!r} has axes tailor cannot read")
        if any(ids.shape[a] > 1 for a in axes):  # type: ignore[union-attr]
            # Normalising or reducing across channels: removing one changes all others.
            self.block(ids, f"{node.op} {node.name!r} combines channels")
        if node.op in _REDUCE:
            keep = bool(node.attrs.get("keepdims", 1))
            reduced = ids
            for a in sorted(axes, reverse=True):
                reduced = np.take(reduced, [0], axis=a)
                if not keep:
                    reduced = reduced.squeeze(a)
            self.set(out, reduced)
        else:
            self.set(out, ids)
        for extra in node.outputs[1:]:
            self.set(extra, None)

    def _axes(self, node: Node, rank: int) -> list[int] | None:
        op = node.op
        if op in ("Softmax", "LogSoftmax", "Hardmax"):
            default = -1 if self.model.opset >= 13 else 1
            axis = int(node.attrs.get("axis", default)) % rank
            return [axis] if self.model.opset >= 13 else list(range(axis, rank))
        if op == "LayerNormalization":
            return list(range(int(node.attrs.get("axis", -1)) % rank, rank))
        if op == "LpNormalization":
            return [int(node.attrs.get("axis", -1)) % rank]
        if "axes" in node.attrs:
            return [int(a) % rank for a in node.attrs["axes"]]
        if len(node.inputs) > 1 and node.inputs[1].name:
            value = self.model.constant_value(node.inputs[1])
            return None if value is None else [int(a) % rank for a in np.atleast_1d(value)]
        if node.attrs.get("noop_with_empty_axes", 0):
            return []
        return list(range(rank))

    def move(self, node: Node) -> None:
        x, out = node.inputs[0], node.outputs[0]
        ids = self.get(x)
        full = self.full(x, ids)  # type: ignore[arg-type]
        if node.op == "Transpose":
            perm = node.attrs.get("perm", list(range(full.ndim))[::-1])
            self.set(out, np.transpose(full, perm))
        else:
            self.set(out, np.reshape(full, self.shape(out)))  # type: ignore[arg-type]

    def concat(self, node: Node) -> None:
        out = node.outputs[0]
        out_shape = self.shape(out)
        axis = int(node.attrs["axis"]) % len(out_shape)  # type: ignore[arg-type]
        parts = []
        for t in node.inputs:
            ids = self.get(t)
            shape = self.shape(t)
            if ids is None:
                ids = self.opaque(t, f"Concat {node.name!r} joins a constant")
            parts.append(
                np.broadcast_to(
                    ids, tuple(shape[i] if i == axis else out_shape[i] for i in range(len(shape)))
                )
            )  # type: ignore[index]
        self.set(out, np.concatenate(parts, axis=axis))

    def select(self, node: Node) -> None:
        x = node.inputs[0]
        ids = self.get(x)
        full = self.full(x, ids)  # type: ignore[arg-type]
        rank = full.ndim
        if node.op == "Split":
            axis = int(node.attrs.get("axis", 0)) % rank
            start = 0
            for out in node.outputs:
                size = self.shape(out)[axis]  # type: ignore[index]
                self.set(out, np.take(full, np.arange(start, start + size), axis=axis))
                start += size
            return None
        if node.op == "Gather":
            indices = self.model.constant_value(node.inputs[1])
            if indices is None:
                return self.block_node(node, f"Gather {node.name!r} has data-dependent indices")
            axis = int(node.attrs.get("axis", 0)) % rank
            return self.set(node.outputs[0], np.take(full, indices.astype(np.int64), axis=axis))
        # Slice: opset >= 10 takes starts/ends/axes/steps as inputs.
        if "starts" in node.attrs:
            starts, ends = node.attrs["starts"], node.attrs["ends"]
            axes, steps = node.attrs.get("axes", list(range(len(starts)))), [1] * len(starts)
        else:
            values = [self.model.constant_value(t) if t.name else None for t in node.inputs[1:]]
            if any(v is None for v in values[:2]) or any(
                t.name and v is None for t, v in zip(node.inputs[3:], values[2:], strict=False)
            ):
                return self.block_node(node, f"Slice {node.name!r} has data-dependent bounds")
            starts, ends = values[0], values[1]
            axes = (
                values[2] if len(values) > 2 and values[2] is not None else list(range(len(starts)))
            )
            steps = values[3] if len(values) > 3 and values[3] is not None else [1] * len(starts)
        index = [slice(None)] * rank
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            index[int(a) % rank] = slice(int(s), int(e), int(st))
        self.set(node.outputs[0], full[tuple(index)])

    # -- groups ----------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        uf = self.uf
        root = np.array([uf.find(a) for a in range(len(uf.parent))], np.int64)
        class_blocked: dict[int, str] = {}
        for atom, reason in self.blocked.items():
            class_blocked.setdefault(int(root[atom]), reason)
        class_blocks: dict[int, int] = defaultdict(lambda: 1)
        for atom, b in self.atom_blocks.items():
            r = int(root[atom])
            class_blocks[r] = math.lcm(class_blocks[r], b)
        prod_of: dict[int, set[str]] = defaultdict(set)
        cons_of: dict[int, set[str]] = defaultdict(set)
        for name, atoms in self.producers.items():
            for r in np.unique(root[atoms]):
                prod_of[int(r)].add(name)
        for name, chan in self.consumers.items():
            for r in np.unique(root[chan]):
                cons_of[int(r)].add(name)
        order = [n.name for n in self.model.nodes]
        rank_of = {n: i for i, n in enumerate(order)}
        keyed: dict[tuple, list[int]] = defaultdict(list)
        for r in prod_of:
            key = (
                tuple(sorted(prod_of[r], key=rank_of.__getitem__)),
                tuple(sorted(cons_of.get(r, ()), key=rank_of.__getitem__)),
                r in class_blocked,
                class_blocks[r],
            )
            keyed[key].append(r)
        # Order classes by their first producer's channel index, groups by first producer.
        first_pos: dict[int, int] = {}
        for name in sorted(self.producers, key=rank_of.__getitem__):
            for pos, r in enumerate(root[self.producers[name]]):
                first_pos.setdefault(int(r), rank_of[name] * 1_000_000 + pos)
        out = []
        for (prods, cons, is_blocked, blocks), classes in sorted(
            keyed.items(), key=lambda kv: min(first_pos[c] for c in kv[1])
        ):
            classes.sort(key=first_pos.__getitem__)
            label = np.full(len(root), -1, np.int64)
            label[np.array(classes)] = np.arange(len(classes))
            labels_of = label[root]
            tensors = {}
            carriers = []
            for node in self.model.nodes:
                touched = False
                for t in node.outputs:
                    ids = self.ids.get(t.name)
                    if ids is not None and (labels_of[ids] >= 0).any():
                        tensors[t.name] = labels_of[ids]
                        touched = True
                if touched and node.name not in prods:
                    carriers.append(node.name)
            reasons = sorted({class_blocked[c] for c in classes if c in class_blocked})
            out.append(
                ChannelGroup(
                    id=len(out),
                    size=len(classes),
                    producers={p: labels_of[self.producers[p]] for p in prods},
                    consumers={c: labels_of[self.consumers[c]] for c in cons},
                    carriers=carriers,
                    tensors=tensors,
                    prunable=not is_blocked,
                    reasons=reasons,
                    blocks=blocks,
                )
            )
        return out


_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial"}  # fmt: skip


def _integer(dtype) -> bool:
    try:
        return np.dtype(dtype).kind in "iu"
    except TypeError:  # None, or a type numpy does not know
        return False


def _static_view(model: Model) -> Model:
    """The model, or a batch-1 copy whose shape arithmetic is observed in one onnxruntime run.

    ONNX shape inference cannot cancel a symbolic batch nor evaluate all shape arithmetic:
    torchvision's channel shuffle (`view(n, g, c // g, h, w)`, then `view(n, -1, h, w)`)
    and `chunk` (Slice bounds computed from `Shape`) leave every later tensor without a
    static shape, which would fix all their channels. Channel coupling does not depend on
    the batch, so when some shape is unknown but the inputs are static apart from the
    batch, the view is built on a copy run once at batch 1: integer tensors computed only
    from shapes and constants take the values they had and become constants, and shape
    inference runs again. Data-dependent shapes stay unknown (and their channels fixed).
    """

    def unknown(t: Tensor) -> bool:
        try:
            model.static_shape(t, batch=1)
        except DynamicShapeError:
            return True
        return False

    used = [
        t
        for t in model.tensors().values()
        if isinstance(t, Variable) and t.name and (t.outputs or model.is_graph_output(t))
    ]
    if not any(unknown(t) for t in used) or any(unknown(t) for t in model.inputs):
        return model
    view = model.copy()
    tensors = view.tensors()
    outputs = list(view.outputs)
    names = {t.name for t in view.inputs} | {t.name for t in outputs}
    # Shape arithmetic is integer: only those tensors become outputs for the one run.
    view.graph.outputs.extend(
        t
        for name, t in tensors.items()
        if isinstance(t, Variable) and name and name not in names and _integer(t.dtype)
    )
    feeds = random_inputs(view, batch=1)
    try:
        sess = make_session(view)
        fetch = [o.name for o in sess.get_outputs()]
        observed = dict(zip(fetch, sess.run(fetch, feeds), strict=True))
    except Exception as e:  # onnxruntime raises its own exception types
        logger.info("dependency view: cannot observe shapes at batch 1 (%s)", e)
        return model
    finally:
        view.graph.outputs = outputs
    static: set[str] = set()
    for node in view.nodes:
        if node.op in _RANDOM or node.domain not in ("", "ai.onnx", None):
            continue
        if node.op in ("Shape", "Size") or all(
            isinstance(t, Constant) or t.name in static for t in node.inputs if t.name
        ):
            static.update(t.name for t in node.outputs if t.name)
    for name in static:
        value, t = observed.get(name), tensors[name]
        if isinstance(t, Variable) and isinstance(value, np.ndarray) and _integer(value.dtype):
            t.to_constant(value)
            t.inputs.clear()
    view.graph.nodes = [n for n in view.nodes if n.outputs]
    try:
        return view.set_input_shapes(
            {t.name: [1, *t.shape[1:]] for t in view.inputs if t.shape and t.shape[0] != 1}
        )
    except TailorError as e:
        logger.info("dependency view: shape inference at batch 1 failed (%s)", e)
        return model


def dependency_graph(model: Model) -> DependencyGraph:
    """Groups the model's prunable channels; shapes must be inferred (batch may be dynamic).

    Where ONNX shape inference leaves shapes unknown behind shape arithmetic (a channel
    shuffle, a `chunk`), they are observed by running the model once at batch 1.

    Args:
        model: the model, after :meth:`Model.infer_shapes`.

    Returns:
        The channel groups, in the order of their first producing layer.
    """
    model.toposort()
    walker = _Walker(_static_view(model))
    walker.walk()
    return DependencyGraph(walker.groups())
