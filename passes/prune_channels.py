"""Prunes output channels of Conv/Gemm/MatMul layers: replaces each coupled channel group
(ir.dependency) with a narrower one, and re-fits the next layers by least squares.

Channels are removed physically, so the saving is real on every runtime. A group is what
must be pruned together: the producers' output channels, the consumers' input features
(a Gemm after a Flatten loses every spatial position of a channel), and everything the
channels flow through on the way (BatchNorm and InstanceNorm parameters, PRelu slopes,
per-channel constants of Add/Mul, depthwise convolutions, Reshape/Expand/Resize shape
constants, Split sizes, Slice bounds, Gather indices).

Steps:

1. For every prunable group whose producers include a selected layer, rank its channels
   by the criterion (summed over the producers, each normalised by its mean) and keep
   `ceil(size * (1 - ratio))`, rounded up to a multiple of `round_to` (and of the number
   of blocks of a grouped convolution, which lose channels evenly), at least
   `min_channels`. Where a tensor lays channels of one or more groups out along two axes
   (a channel shuffle's `[N, 2, C/2, H, W]`), the channels at one position of every row
   form a unit, and the linked groups lose whole units, so that tensor stays rectangular.
2. Remove them all at once, on a copy. A group whose removal something cannot follow
   (a shape constant that cannot express it, run-time shape arithmetic that hard-codes
   a channel count, a tensor that would become empty) is skipped with the reason and the
   rest are pruned again. The check runs the pruned model once at batch 1 in onnxruntime
   and compares every tensor's shape, and every run-time computed Slice bound or Gather
   index, with what the removal implies (ONNX shape inference where no run is possible).
3. With calibration data and `reconstruct`, every layer that reads pruned channels is
   re-fitted, in topological order, so that its output on the pruned model's activations
   matches the original model's output (ridge least squares towards the current weights,
   on at most 20,000 sampled rows, one fifth of the samples held out to measure the
   error). A re-fit that does not lower the held-out error is not kept. Each round
   resumes from cached activations, so each node runs about once per model overall.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tailor.errors import ParameterError, PassError, TailorError, UnsupportedModelError
from tailor.ir.activations import capture
from tailor.ir.dependency import (
    _ELEMENTWISE,
    _NO_CHANNELS,
    _REDUCE,
    _SPATIAL,
    _UNARY,
    ChannelGroup,
    dependency_graph,
)
from tailor.ir.layers import layer_weight, layers, summarize
from tailor.ir.model import Model, Node, Tensor, Variable
from tailor.ir.ort import make_session, random_inputs
from tailor.passes._prune_refit import _MAX_SAMPLES, _batch_size, _reconstruct
from tailor.passes._prune_select import elimination_scores, gather_normals
from tailor.passes.base import REQUIRED, Param, Pass, PassContext, PassResult
from tailor.passes.registry import register
from tailor.passes.rewrite import refresh_shapes

__all__ = ["PruneChannels", "CRITERIA"]

logger = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn_scale", "activation", "apoz", "refit")
_DATA_CRITERIA = ("activation", "apoz", "refit")

_ACTIVATIONS = {
    "Relu", "Clip", "LeakyRelu", "PRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu",
    "Selu", "Celu", "Gelu", "Softplus", "Mish", "ThresholdedRelu",
}  # fmt: skip
# Ops that never hold a per-channel constant: nothing to rewrite when channels go.
_PASSIVE = (
    (_SPATIAL - {"Resize"})
    | _REDUCE
    | _NO_CHANNELS
    | {"Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat"}
    | {"Softmax", "LogSoftmax", "Hardmax", "LpNormalization"}
)

Keeps = list  # per axis of a tensor: None (untouched) or a boolean keep vector


# ---------------------------------------------------------------------- the plan
@dataclass
class _Plan:
    """Which channels of one group go."""

    group: ChannelGroup
    removed: np.ndarray
    criterion: str


@dataclass
class _Removal:
    """The combined effect of several groups' removals on layers and tensors."""

    out_keep: dict[str, np.ndarray] = field(default_factory=dict)
    in_keep: dict[str, np.ndarray] = field(default_factory=dict)
    axes: dict[str, Keeps] = field(default_factory=dict)
    owners: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    problems: list[tuple[set[int], str]] = field(default_factory=list)

    @classmethod
    def build(cls, plans: list[_Plan]) -> _Removal:
        out = cls()
        gone: dict[str, np.ndarray] = {}
        for plan in plans:
            g, rm = plan.group, plan.removed
            for layer, labels in g.producers.items():
                hit = np.isin(labels, rm)
                out.out_keep[layer] = out.out_keep.get(layer, np.ones(len(labels), bool)) & ~hit
                out.owners[layer].add(g.id)
            for layer, labels in g.consumers.items():
                hit = np.isin(labels, rm)
                out.in_keep[layer] = out.in_keep.get(layer, np.ones(len(labels), bool)) & ~hit
                out.owners[layer].add(g.id)
            for name, labels in g.tensors.items():
                hit = np.isin(labels, rm)
                if hit.any():
                    gone[name] = gone[name] | hit if name in gone else hit
                    out.owners[name].add(g.id)
        for name, hit in gone.items():
            keep = ~hit
            per_axis: Keeps = []
            for axis in range(keep.ndim):
                if keep.shape[axis] == 1:
                    per_axis.append(None)
                    continue
                other = tuple(a for a in range(keep.ndim) if a != axis)
                per_axis.append(keep.any(axis=other) if other else keep.copy())
            product = np.ones([1] * keep.ndim, bool)
            for axis, k in enumerate(per_axis):
                if k is not None:
                    product = product & k.reshape(
                        [-1 if a == axis else 1 for a in range(keep.ndim)]
                    )
            if not np.array_equal(np.broadcast_to(product, keep.shape), keep):
                out.problems.append(
                    (
                        set(out.owners[name]),
                        f"tensor {name!r} would need different channels removed along its axes "
                        "(a channel shuffle or reshape couples these groups position by position)",
                    )
                )
            elif any(k is not None and not k.any() for k in per_axis):
                out.problems.append(
                    (set(out.owners[name]), f"tensor {name!r} would lose all its channels")
                )
            per_axis = [None if k is None or k.all() else k for k in per_axis]
            if any(k is not None for k in per_axis):
                out.axes[name] = per_axis
        out.out_keep = {k: v for k, v in out.out_keep.items() if not v.all()}
        out.in_keep = {k: v for k, v in out.in_keep.items() if not v.all()}
        return out


def _count(keeps: Keeps | None, axis: int, default: Any) -> Any:
    if keeps is None or axis >= len(keeps) or keeps[axis] is None:
        return default
    return int(keeps[axis].sum())


# ---------------------------------------------------------------------- observation
@dataclass
class _Observed:
    """What one batch-1 onnxruntime run showed: every tensor's shape, and the values of
    the small integer tensors (shape arithmetic computed at run time)."""

    shapes: dict[str, tuple[int, ...]]
    values: dict[str, np.ndarray]
    ran: bool = True


def _inferred(model: Model) -> _Observed:
    """The static shapes ONNX inference found (batch read as 1), when a run is impossible."""
    shapes = {}
    for t in model.tensors().values():
        if isinstance(t, Variable) and t.shape is not None:
            try:
                shapes[t.name] = model.static_shape(t, batch=1)
            except TailorError:
                continue
    return _Observed(shapes, {}, ran=False)


def _observe(model: Model) -> _Observed:
    """Runs `model` once at batch 1 on random inputs and records every tensor.

    Raises:
        TailorError: onnxruntime cannot build or run the model, or an input has a
            symbolic dimension besides the batch.
    """
    probe = model.copy()
    names = {t.name for t in probe.inputs} | {t.name for t in probe.outputs}
    probe.graph.outputs.extend(
        t
        for name, t in probe.tensors().items()
        if isinstance(t, Variable) and name and name not in names and t.dtype is not None
    )
    feeds = random_inputs(probe, batch=1)
    sess = make_session(probe)
    fetch = [o.name for o in sess.get_outputs()]
    try:
        values = dict(zip(fetch, sess.run(fetch, feeds), strict=True))
    except Exception as e:  # onnxruntime raises its own exception types
        raise UnsupportedModelError(f"onnxruntime cannot run the model: {e}") from e
    values.update(feeds)
    shapes = {k: tuple(v.shape) for k, v in values.items() if isinstance(v, np.ndarray)}
    ints = {
        k: v
        for k, v in values.items()
        if isinstance(v, np.ndarray) and v.dtype.kind in "iu" and v.size <= 4096
    }
    return _Observed(shapes, ints)


# ---------------------------------------------------------------------- graph surgery
class _Surgeon:
    """Applies a :class:`_Removal` to a model, collecting what it cannot express."""

    def __init__(self, model: Model, removal: _Removal, observed: _Observed):
        self.model = model
        self.removal = removal
        self.observed = observed
        self.problems: list[tuple[set[int], str]] = []
        #: checks on the pruned model's run: (groups, what, check(observed) -> ok)
        self.expectations: list[tuple[set[int], str, Callable[[_Observed], bool]]] = []

    # -- helpers ---------------------------------------------------------------
    def keeps(self, t: Tensor) -> Keeps | None:
        return self.removal.axes.get(t.name)

    def static(self, t: Tensor) -> list[int] | None:
        """Original dims at batch 1, as observed."""
        shape = self.observed.shapes.get(t.name)
        if shape is None:
            value = self.model.constant_value(t)
            return None if value is None else list(value.shape)
        return list(shape)

    def param(self, t: Tensor) -> np.ndarray | None:
        """A constant input's value, or what a run-time computed one was at batch 1."""
        value = self.model.constant_value(t)
        return value if value is not None else self.observed.values.get(t.name)

    def runtime(self, t: Tensor) -> bool:
        return self.model.constant_value(t) is None

    def new_static(self, t: Tensor) -> list[int] | None:
        dims = self.static(t)
        if dims is None:
            return None
        keeps = self.keeps(t)
        return [_count(keeps, a, d) for a, d in enumerate(dims)]

    def owners(self, node: Node) -> set[int]:
        found = set(self.removal.owners.get(node.name, ()))
        for t in list(node.inputs) + list(node.outputs):
            found |= self.removal.owners.get(t.name, set())
        return found

    def fail(self, node: Node, reason: str) -> None:
        self.problems.append((self.owners(node), f"{node.op} {node.name!r}: {reason}"))

    def expect(self, node: Node, what: str, check: Callable[[_Observed], bool]) -> None:
        """A run-time computed input must come out right in the pruned model's run."""
        self.expectations.append((self.owners(node), f"{node.op} {node.name!r}: {what}", check))

    def const(self, node: Node, index: int, value: np.ndarray, hint: str) -> None:
        new = self.model.add_constant(f"{node.name}_{hint}", np.asarray(value))
        if index < len(node.inputs):
            node.inputs[index] = new
        else:
            while len(node.inputs) < index:
                node.inputs.append(Variable.empty())
            node.inputs.append(new)

    # -- dispatch --------------------------------------------------------------
    def apply(self) -> list[tuple[set[int], str]]:
        rm = self.removal
        for node in list(self.model.nodes):
            touched = any(t.name in rm.axes for t in list(node.inputs) + list(node.outputs))
            if node.name in rm.out_keep or node.name in rm.in_keep:
                self.layer(node, rm.out_keep.get(node.name), rm.in_keep.get(node.name))
            elif not touched:
                continue
            elif layer_weight(self.model, node) is not None:
                self.depthwise(node)
            elif node.op in ("BatchNormalization", "InstanceNormalization"):
                self.per_channel(node)
            elif node.op in ("QuantizeLinear", "DequantizeLinear"):
                self.per_axis(node)
            elif node.op == "Expand":
                self.expand(node)
            elif node.op in _UNARY or node.op in _ELEMENTWISE or node.op == "LayerNormalization":
                self.broadcast(node)
            elif node.op == "Reshape":
                self.reshape(node)
            elif node.op == "Resize":
                self.resize(node)
            elif node.op == "Split":
                self.split(node)
            elif node.op == "Slice":
                self.slice(node)
            elif node.op == "Gather":
                self.gather(node)
            elif node.op not in _PASSIVE:
                self.fail(node, "tailor cannot rewrite this op for fewer channels")
        return self.problems

    # -- layers ----------------------------------------------------------------
    def layer(self, node: Node, out_keep: np.ndarray | None, in_keep: np.ndarray | None) -> None:
        widx, w = layer_weight(self.model, node)  # type: ignore[misc]
        op, groups = node.op, int(node.attrs.get("group", 1))
        bias_index = 2 if op in ("Conv", "ConvTranspose", "Gemm") else None
        bias = None
        if (
            bias_index is not None
            and len(node.inputs) > bias_index
            and node.inputs[bias_index].name
        ):
            bias = self.model.constant_value(node.inputs[bias_index])
            if bias is None and out_keep is not None:
                return self.fail(node, "its bias is computed at run time")
        if op == "ConvTranspose" and groups != 1:
            return self.fail(node, "grouped ConvTranspose is not supported")
        if op == "Conv":
            if out_keep is not None:
                if groups > 1 and len(set(out_keep.reshape(groups, -1).sum(axis=1))) != 1:
                    return self.fail(node, f"its {groups} groups would lose unequal channel counts")
                w = w[out_keep]
            if in_keep is not None:
                if groups == 1:
                    w = w[:, in_keep]
                else:
                    per_group = in_keep.reshape(groups, -1)
                    if len(set(per_group.sum(axis=1))) != 1:
                        return self.fail(
                            node, f"its {groups} groups would lose unequal input counts"
                        )
                    rows = w.shape[0] // groups
                    w = np.concatenate(
                        [w[g * rows : (g + 1) * rows][:, per_group[g]] for g in range(groups)]
                    )
        elif op == "ConvTranspose":
            if out_keep is not None:
                w = w[:, out_keep]
            if in_keep is not None:
                w = w[in_keep]
        elif op == "Gemm":
            if node.attrs.get("transA", 0):
                return self.fail(node, "Gemm with transA is not supported")
            trans_b = bool(node.attrs.get("transB", 0))
            if out_keep is not None:
                w = w[out_keep] if trans_b else w[:, out_keep]
            if in_keep is not None:
                w = w[:, in_keep] if trans_b else w[in_keep]
        else:  # MatMul, weight second
            if widx != 1:
                return self.fail(node, "MatMul with its weight first is not supported")
            if out_keep is not None:
                w = w[..., out_keep]
            if in_keep is not None:
                w = w[..., in_keep, :]
        self.const(node, widx, w, "w_pruned")
        if bias is not None and out_keep is not None:
            if op == "Gemm":
                if bias.ndim and bias.shape[-1] == len(out_keep) and len(out_keep) > 1:
                    self.const(node, 2, bias[..., out_keep], "bias_pruned")
            else:
                self.const(node, 2, bias[out_keep], "bias_pruned")

    def depthwise(self, node: Node) -> None:
        _, w = layer_weight(self.model, node)  # type: ignore[misc]
        groups = int(node.attrs.get("group", 1))
        x, y = node.inputs[0], node.outputs[0]
        in_keep, out_keep = (self.keeps(x) or [None, None])[1], (self.keeps(y) or [None, None])[1]
        if node.op != "Conv" or in_keep is None or out_keep is None or groups != len(in_keep):
            return self.fail(node, "a layer inside a group that is not a depthwise Conv")
        multiplier = w.shape[0] // groups
        if int(out_keep.sum()) != int(in_keep.sum()) * multiplier:
            return self.fail(node, "its channel multiplier would not be preserved")
        self.const(node, 1, w[out_keep], "w_pruned")
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = self.model.constant_value(node.inputs[2])
            if bias is None:
                return self.fail(node, "its bias is computed at run time")
            self.const(node, 2, bias[out_keep], "bias_pruned")
        node.attrs["group"] = int(in_keep.sum())

    # -- carriers --------------------------------------------------------------
    def per_channel(self, node: Node) -> None:
        keep = (self.keeps(node.inputs[0]) or [None, None])[1]
        if keep is None:
            return None
        for i in range(1, len(node.inputs)):
            value = self.model.constant_value(node.inputs[i])
            if value is None:
                return self.fail(node, f"parameter {node.inputs[i].name!r} is not a constant")
            self.const(node, i, value.reshape(-1)[keep].reshape((-1,) + value.shape[1:]), "pruned")
        return None

    def per_axis(self, node: Node) -> None:
        keeps = self.keeps(node.inputs[0]) or self.keeps(node.outputs[0])
        axis = int(node.attrs.get("axis", 1)) % len(keeps)  # type: ignore[arg-type]
        for i in range(1, len(node.inputs)):
            value = self.model.constant_value(node.inputs[i])
            if value is None or value.size <= 1:
                continue
            if keeps[axis] is None or value.ndim != 1 or len(value) != len(keeps[axis]):  # type: ignore[index]
                return self.fail(node, "its quantization parameters do not follow the channels")
            self.const(node, i, value[keeps[axis]], "pruned")  # type: ignore[index]
        return None

    def broadcast(self, node: Node) -> None:
        """Slices constant operands along the pruned axes they broadcast with."""
        out = node.outputs[0]
        keeps = self.keeps(out)
        if keeps is None:
            return None
        rank = len(keeps)
        for i, t in enumerate(node.inputs):
            if not t.name or t.name in self.removal.axes:
                continue
            value = self.model.constant_value(t)
            shape = list(value.shape) if value is not None else self.static(t)
            if shape is None:
                return self.fail(node, f"operand {t.name!r} has no known shape")
            pad = rank - len(shape)
            index: list[Any] = [slice(None)] * len(shape)
            for axis, keep in enumerate(keeps):
                j = axis - pad
                if keep is None or j < 0 or shape[j] == 1:
                    continue
                if shape[j] != len(keep) or value is None:
                    return self.fail(node, f"operand {t.name!r} does not follow the channels")
                index[j] = keep
            if value is not None and any(not isinstance(s, slice) for s in index):
                for j, sel in enumerate(index):
                    if not isinstance(sel, slice):
                        value = np.compress(sel, value, axis=j)
                self.const(node, i, value, "pruned")
        return None

    def expand(self, node: Node) -> None:
        keeps = self.keeps(node.outputs[0])
        if keeps is None or self.runtime(node.inputs[1]):
            return None  # a run-time shape must follow by itself: the output shape is checked
        value = self.model.constant_value(node.inputs[1]).copy()  # type: ignore[union-attr]
        pad = len(keeps) - len(value)
        for axis, keep in enumerate(keeps):
            j = axis - pad
            if keep is not None and j >= 0 and value[j] != 1:
                value[j] = int(keep.sum())
        self.const(node, 1, value, "shape_pruned")
        return None

    def reshape(self, node: Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        value = self.param(node.inputs[1])
        if value is None:
            return self.fail(node, "its target shape is unknown")
        out_keeps = self.keeps(y)
        in_new, out_new = self.new_static(x), self.new_static(y)
        if in_new is None or out_new is None:
            return self.fail(node, "its shapes are unknown")
        new = np.array(value, dtype=value.dtype)
        for axis, keep in enumerate(out_keeps or []):
            if keep is not None and new[axis] != -1:
                new[axis] = int(keep.sum())
        allowzero = int(node.attrs.get("allowzero", 0))
        resolved = [
            in_new[i] if v == 0 and not allowzero and i < len(in_new) else int(v)
            for i, v in enumerate(new)
        ]
        if -1 in resolved:
            known = math.prod(v for v in resolved if v != -1)
            if known == 0 or math.prod(in_new) % known:
                return self.fail(node, f"shape {value.tolist()} cannot express the pruned layout")
            resolved[resolved.index(-1)] = math.prod(in_new) // known
        if resolved != out_new:
            return self.fail(node, f"shape {value.tolist()} cannot express the pruned layout")
        # A run-time shape must come out as `new` by itself: the output shape is checked.
        if not np.array_equal(new, value) and not self.runtime(node.inputs[1]):
            self.const(node, 1, new, "shape_pruned")
        return None

    def resize(self, node: Node) -> None:
        keeps = self.keeps(node.outputs[0])
        if keeps is None or len(node.inputs) < 4 or not node.inputs[3].name:
            return None
        if self.runtime(node.inputs[3]):
            return None  # the output shape is checked
        sizes = self.model.constant_value(node.inputs[3]).copy()  # type: ignore[union-attr]
        for axis, keep in enumerate(keeps):
            if keep is not None:
                sizes[axis] = int(keep.sum())
        self.const(node, 3, sizes, "sizes_pruned")
        return None

    def split(self, node: Node) -> None:
        x = node.inputs[0]
        keeps = self.keeps(x)
        if keeps is None:
            return None
        axis = int(node.attrs.get("axis", 0)) % len(keeps)
        if keeps[axis] is None:
            return None
        sizes = []
        for out in node.outputs:
            dims = self.static(out)
            if dims is None:
                return self.fail(node, f"output {out.name!r} has no known shape")
            sizes.append(_count(self.keeps(out), axis, dims[axis]))
        if sum(sizes) != int(keeps[axis].sum()) or min(sizes) == 0:
            return self.fail(node, "its outputs do not partition the remaining channels")
        if len(node.inputs) > 1 and node.inputs[1].name and self.runtime(node.inputs[1]):
            return None  # run-time sizes must follow by themselves: output shapes are checked
        if self.model.opset >= 13:
            node.attrs.pop("num_outputs", None)
            self.const(node, 1, np.array(sizes, np.int64), "split_pruned")
        else:
            node.attrs["split"] = sizes
        return None

    def slice(self, node: Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        in_keeps, out_keeps = self.keeps(x), self.keeps(y)
        if in_keeps is None:
            return None
        legacy = "starts" in node.attrs  # opset < 10: bounds are attributes
        bounds = self._slice_bounds(node, self.param)
        if bounds is None:
            return self.fail(node, "its bounds are unknown")
        starts, ends, axes, steps = bounds
        dims = self.static(x)
        targets: dict[int, range] = {}
        for j, axis in enumerate(axes):
            keep = in_keeps[axis]
            if keep is None:
                continue
            size = len(keep) if dims is None else dims[axis]
            selected = np.arange(size)[slice(starts[j], ends[j], steps[j])]
            kept = keep[selected]
            out_keep = out_keeps[axis] if out_keeps is not None else None
            if (out_keep is not None and not np.array_equal(out_keep, kept)) or (
                out_keep is None and not kept.all()
            ):
                return self.fail(node, "its bounds do not follow the channels")
            pos = (np.cumsum(keep) - 1)[selected[kept]]
            if len(pos) == 0:
                return self.fail(node, "it would select no channel")
            step = int(pos[1] - pos[0]) if len(pos) > 1 else 1
            if step <= 0 or (len(pos) > 1 and (np.diff(pos) != step).any()):
                return self.fail(node, "its stride cannot express the remaining channels")
            if legacy and step != 1:
                return self.fail(node, "its stride cannot express the remaining channels")
            starts[j], ends[j], steps[j] = int(pos[0]), int(pos[-1]) + 1, step
            targets[axis] = range(int(pos[0]), int(pos[-1]) + 1, step)
        if not targets:
            return None
        if legacy:
            node.attrs["starts"], node.attrs["ends"] = starts, ends
            return None
        present = [t for t in node.inputs[1:] if t.name]
        dtype = self.param(node.inputs[1]).dtype  # type: ignore[union-attr]
        for index, values, hint in ((1, starts, "starts"), (2, ends, "ends")):
            if not self.runtime(node.inputs[index]):
                self.const(node, index, np.array(values, dtype), f"{hint}_pruned")
        if any(s != 1 for s in steps) or (len(node.inputs) > 4 and node.inputs[4].name):
            if any(self.runtime(t) for t in node.inputs[3:5] if t.name):
                return self.fail(node, "its run-time stride cannot express the remaining channels")
            self.const(node, 3, np.array(axes, dtype), "axes_pruned")
            self.const(node, 4, np.array(steps, dtype), "steps_pruned")
        if any(self.runtime(t) for t in present):
            new_dims = self.new_static(x)

            def check(observed: _Observed) -> bool:
                def value(t: Tensor) -> np.ndarray | None:
                    v = self.model.constant_value(t)
                    return v if v is not None else observed.values.get(t.name)

                found = self._slice_bounds(node, value)
                if found is None or new_dims is None:
                    return False
                for j, axis in enumerate(found[2]):
                    if axis in targets:
                        sl = slice(found[0][j], found[1][j], found[3][j])
                        if range(new_dims[axis])[sl] != targets[axis]:
                            return False
                return True

            self.expect(node, "its run-time bounds do not follow the channels", check)
        return None

    def _slice_bounds(
        self, node: Node, value: Callable[[Tensor], np.ndarray | None]
    ) -> tuple[list[int], list[int], list[int], list[int]] | None:
        """(starts, ends, axes, steps) of a Slice, axes normalised; None if unknown."""
        rank = len(self.static(node.inputs[0]) or self.keeps(node.inputs[0]) or [])
        if "starts" in node.attrs:
            starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
            axes = list(node.attrs.get("axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            ins = node.inputs[1:]
            values = [value(t) if t.name else None for t in ins]
            if any(v is None for v in values[:2]) or any(
                t.name and v is None for t, v in zip(ins[2:], values[2:], strict=False)
            ):
                return None
            starts = [int(v) for v in values[0]]  # type: ignore[union-attr]
            ends = [int(v) for v in values[1]]  # type: ignore[union-attr]
            axes = (
                [int(v) for v in values[2]]
                if len(values) > 2 and values[2] is not None
                else list(range(len(starts)))
            )
            steps = (
                [int(v) for v in values[3]]
                if len(values) > 3 and values[3] is not None
                else [1] * len(starts)
            )
        return (
            [int(v) for v in starts],
            [int(v) for v in ends],
            [int(a) % rank for a in axes],
            steps,
        )

    def gather(self, node: Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        keeps = self.keeps(x)
        if keeps is None:
            return None
        axis = int(node.attrs.get("axis", 0)) % len(keeps)
        keep = keeps[axis]
        if keep is None:
            return None
        indices = self.param(node.inputs[1])
        if indices is None or indices.ndim > 1:
            return self.fail(node, "its indices do not follow the channels")
        flat = np.where(indices < 0, indices + len(keep), indices).astype(np.int64)
        pos = np.cumsum(keep) - 1
        kept = keep[flat]
        out_keeps = self.keeps(y)
        if indices.ndim == 0:
            if not kept:
                return self.fail(node, "it reads a removed channel")
            new = np.asarray(pos[flat], indices.dtype)
        else:
            out_keep = out_keeps[axis] if out_keeps is not None else None
            if (out_keep is not None and not np.array_equal(out_keep, kept)) or not kept.any():
                return self.fail(node, "its indices do not follow the channels")
            new = pos[flat[kept]].astype(indices.dtype)
        if not self.runtime(node.inputs[1]):
            self.const(node, 1, new, "indices_pruned")
            return None
        name, length = node.inputs[1].name, int(keep.sum())

        def check(observed: _Observed) -> bool:
            got = observed.values.get(name)
            return got is not None and np.array_equal(np.where(got < 0, got + length, got), new)

        self.expect(node, "its run-time indices do not follow the channels", check)
        return None


def _verify(
    model: Model,
    removal: _Removal,
    observed: _Observed,
    expectations: list[tuple[set[int], str, Callable[[_Observed], bool]]],
) -> list[tuple[set[int], str]]:
    """Runs the pruned model once at batch 1 and checks every tensor's shape and every
    run-time computed bound against what the removal implies; blames the groups."""
    everything = set().union(*removal.owners.values())
    try:
        refresh_shapes(model)
        after = _observe(model) if observed.ran else _inferred(model)
    except TailorError as e:
        # Only shape arithmetic computed at run time can break a run the checks let through.
        suspects: set[int] = set()
        for node in model.nodes:
            if any(model.constant_value(t) is None for t in node.inputs[1:] if t.name):
                if node.op in ("Reshape", "Expand", "Slice", "Split", "Resize", "Gather", "Tile"):
                    suspects |= removal.owners.get(node.inputs[0].name, set())
        return [(suspects or everything, f"the pruned model does not run: {e}")]
    problems = []
    for name, old in observed.shapes.items():
        have = after.shapes.get(name)
        if have is None and observed.ran:
            continue
        keeps = removal.axes.get(name)
        want = tuple(_count(keeps, a, d) for a, d in enumerate(old))
        if have != want:
            problems.append(
                (
                    _blame(model, model.tensor(name), removal),
                    f"tensor {name!r} would have shape {None if have is None else list(have)}, "
                    f"expected {list(want)}",
                )
            )
    for owners, what, check in expectations:
        if not check(after):
            problems.append((owners or everything, what))
    return problems


def _blame(model: Model, tensor: Tensor, removal: _Removal) -> set[int]:
    """The groups owning `tensor`, or else the nearest owned tensors upstream of it."""
    found: set[int] = set()
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if removal.owners.get(t.name):
            found |= removal.owners[t.name]
            continue
        producer = model.producer(t)
        if producer is not None:
            found |= removal.owners.get(producer.name, set())
            stack.extend(producer.inputs)
    return found or set().union(*removal.owners.values())


# ---------------------------------------------------------------------- linked channels
def _linked_units(
    groups: list[ChannelGroup],
) -> list[tuple[list[int], list[list[tuple[int, int]]], set[int]]]:
    """Channels that must go together because a tensor lays them out along two axes.

    A channel shuffle reshapes `[N, C, H, W]` into `[N, 2, C/2, H, W]`: one row per
    branch. Removing channels keeps that tensor rectangular only if the same positions go
    from both rows, so position j of every row becomes one unit (linking channel j of
    one group with channel j of the other). Units are cut along the longest varying
    axis; a unit that shares a position with a channel of no candidate group is pinned.

    Returns:
        Per set of linked groups: their ids, the units (lists of `(group id, channel)`)
        and the indices of pinned units.
    """
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(a: tuple[int, int]) -> tuple[int, int]:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for g in groups:
        for name, labels in g.tensors.items():
            by_tensor[name].append((g.id, labels))
    involved: set[int] = set()
    pins: list[tuple[int, int]] = []
    for entries in by_tensor.values():
        shape = entries[0][1].shape
        varying = [a for a, n in enumerate(shape) if n > 1]
        if len(varying) < 2 or any(labels.shape != shape for _, labels in entries):
            continue
        axis = max(varying, key=lambda a: (shape[a], a))
        for i in range(shape[axis]):
            members: list[tuple[int, int]] = []
            covered = None
            for gid, labels in entries:
                slab = np.take(labels, i, axis=axis)
                members += [(gid, int(c)) for c in np.unique(slab[slab >= 0])]
                covered = slab >= 0 if covered is None else covered | (slab >= 0)
            if not members:
                continue
            involved.update(gid for gid, _ in members)
            for m in members[1:]:
                ra, rb = find(members[0]), find(m)
                if ra != rb:
                    parent[rb] = ra
            if covered is not None and not covered.all():
                pins.append(members[0])
    if not involved:
        return []
    # Linked groups form components; every channel of them is a unit or part of one.
    sizes = {g.id: g.size for g in groups}
    component: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for gid in involved:
        for c in range(sizes[gid]):
            component[find((gid, c))].append((gid, c))
    owner = {gid: gid for gid in involved}

    def top(gid: int) -> int:
        while owner[gid] != gid:
            gid = owner[gid]
        return gid

    for members in component.values():
        gids = sorted({gid for gid, _ in members})
        for gid in gids[1:]:
            a, b = top(gids[0]), top(gid)
            if a != b:
                owner[b] = a
    pinned_roots = {find(p) for p in pins}
    out = []
    for root_gid in sorted({top(g) for g in involved}):
        gids = sorted(g for g in involved if top(g) == root_gid)
        roots = sorted(r for r in component if top(r[0]) == root_gid)
        units = [sorted(component[r]) for r in roots]
        pinned = {u for u, r in enumerate(roots) if r in pinned_roots}
        out.append((gids, units, pinned))
    return out


# ---------------------------------------------------------------------- criteria
def _as_rows(node: Node, arr: np.ndarray) -> np.ndarray:
    """An array laid out like the layer's weight, as `[out_channels, -1]`."""
    if node.op == "Conv":
        return arr.reshape(arr.shape[0], -1)
    if node.op == "ConvTranspose":
        return np.moveaxis(arr, 1, 0).reshape(arr.shape[1], -1)
    if node.op == "Gemm":
        return arr if node.attrs.get("transB", 0) else arr.T
    return np.moveaxis(arr, -1, 0).reshape(arr.shape[-1], -1)


def _out_rows(model: Model, node: Node) -> np.ndarray:
    """The layer's weight as `[out_channels, -1]`."""
    return _as_rows(node, layer_weight(model, node)[1])  # type: ignore[index]


def _weight_mask(
    node: Node, w: np.ndarray, out_keep: np.ndarray | None, in_keep: np.ndarray | None
) -> np.ndarray:
    """Which entries of the weight `w` survive the removal, shaped like `w`."""
    mask = np.ones(w.shape, bool)
    op = node.op
    trans_b = bool(node.attrs.get("transB", 0))
    out_axis = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0 if trans_b else 1}.get(op, w.ndim - 1)
    in_axis = {"Conv": 1, "ConvTranspose": 0, "Gemm": 1 if trans_b else 0}.get(op, w.ndim - 2)

    def along(keep: np.ndarray, axis: int) -> np.ndarray:
        return keep.reshape([-1 if a == axis else 1 for a in range(w.ndim)])

    if out_keep is not None:
        mask &= along(out_keep, out_axis)
    if in_keep is not None:
        groups = int(node.attrs.get("group", 1)) if op == "Conv" else 1
        per_group = in_keep.reshape(groups, -1)
        rows = w.shape[0] // groups
        for g in range(groups):
            if op == "Conv":
                mask[g * rows : (g + 1) * rows] &= along(per_group[g], 1)
            else:
                mask &= along(in_keep, in_axis)
    return mask


def _activation_tensor(model: Model, node: Node) -> Tensor:
    """The producer's output after the per-channel ops and activation that follow it."""
    t = node.outputs[0]
    while not model.is_graph_output(t):
        readers = model.consumers(t)
        if len(readers) != 1:
            break
        nxt = readers[0]
        others = [i for i in nxt.inputs if i is not t and i.name]
        if nxt.op in ("BatchNormalization", "InstanceNormalization") or (
            nxt.op in ("Add", "Sub", "Mul", "Div")
            and all(model.constant_value(i) is not None for i in others)
        ):
            t = nxt.outputs[0]
            continue
        if nxt.op in _ACTIVATIONS:
            return nxt.outputs[0]
        break
    return t


def _channel_axis(op: str, rank: int) -> int:
    return 1 if op in ("Conv", "ConvTranspose") else rank - 1


def _activation_stats(
    model: Model, data: Mapping[str, np.ndarray], producers: list[str]
) -> dict[str, np.ndarray]:
    """Per producer: `[mean |activation|, fraction of activations <= 0]` per channel."""
    targets: dict[str, list[str]] = defaultdict(list)
    for name in producers:
        node = model.node(name)
        targets[_activation_tensor(model, node).name].append(name)
    sums: dict[str, np.ndarray] = {}
    ops = {name: model.node(name).op for name in producers}

    def reduce(name: str, batch: np.ndarray) -> np.ndarray:
        axis = _channel_axis(ops[targets[name][0]], batch.ndim)
        flat = np.moveaxis(batch, axis, -1).reshape(-1, batch.shape[axis]).astype(np.float64)
        stats = np.stack(
            [np.abs(flat).sum(0), (flat <= 0).sum(0), np.full(flat.shape[1], len(flat))]
        )
        sums[name] = sums[name] + stats if name in sums else stats
        return np.empty((0,))

    capture(model, data, list(targets), reduce=reduce, batch_size=_batch_size(model))
    out = {}
    for tensor, names in targets.items():
        s = sums[tensor]
        for name in names:
            out[name] = np.stack([s[0] / np.maximum(s[2], 1), s[1] / np.maximum(s[2], 1)])
    return out


def _importance(
    model: Model,
    group: ChannelGroup,
    criterion: str,
    stats: dict[str, np.ndarray],
) -> tuple[np.ndarray, str]:
    """Importance of each of the group's channels, and the criterion actually used."""
    scores = np.zeros(group.size)

    def add(labels: np.ndarray, values: np.ndarray) -> None:
        inside = labels >= 0
        mean = float(np.mean(values[inside])) if inside.any() else 0.0
        if mean > 0:
            np.add.at(scores, labels[inside], values[inside] / mean)

    if criterion == "bn_scale":
        found = False
        for name in group.carriers:
            node = model.node(name)
            if node.op != "BatchNormalization":
                continue
            labels = group.tensors.get(node.outputs[0].name)
            gamma = model.constant_value(node.inputs[1])
            if labels is None or gamma is None or labels.ndim < 2:
                continue
            flat = labels.reshape(labels.shape[0], labels.shape[1], -1)
            if labels.shape[1] != gamma.size or (flat != flat[:, :, :1]).any():
                continue
            add(flat[0, :, 0], np.abs(gamma.astype(np.float64)))
            found = True
        if found:
            return scores, criterion
        criterion = "l1"  # no BatchNormalization carries this group
    for name, labels in group.producers.items():
        node = model.node(name)
        if criterion in ("l1", "l2"):
            rows = _out_rows(model, node).astype(np.float64)
            values = np.abs(rows).sum(1) if criterion == "l1" else np.sqrt((rows**2).sum(1))
        elif criterion == "activation":
            values = stats[name][0]
        else:  # apoz: channels that are mostly zero after the activation matter least
            values = 1.0 - stats[name][1] + 1e-12
        add(labels, values)
    return scores, criterion


def _choose(scores: np.ndarray, keep: int, blocks: int) -> np.ndarray:
    """Indices of the channels to remove: the lowest scores, evenly per block."""
    size = len(scores)
    per_block, drop = size // blocks, (size - keep) // blocks
    removed = []
    for b in range(blocks):
        block = scores[b * per_block : (b + 1) * per_block]
        removed.extend(b * per_block + np.argsort(block, kind="stable")[:drop])
    return np.sort(np.asarray(removed, np.int64))


# ---------------------------------------------------------------------- the pass
def _fmt(n: int) -> str:
    return f"{n:,}"


def _skip(notes: dict[str, dict[str, Any]], layer: str, reason: str) -> None:
    """Notes why a group of `layer` was left alone (a layer may produce several)."""
    old = notes[layer].get("skipped")
    notes[layer]["skipped"] = reason if old is None else f"{old}; {reason}"


@register
class PruneChannels(Pass):
    """Prunes output channels of Conv/Gemm/MatMul layers, group by coupled group, and
    re-fits the next layers by least squares on calibration data.

    A group (channels coupled across layers, see `tailor.ir.dependency`) is pruned when
    any of its producing layers matches `layers`; everything coupled to it (residual branches, concats, depthwise
    convolutions, squeeze-excite gates, BatchNorm, Flatten into Gemm) follows. Groups the
    dependency view marks as fixed, and groups whose removal a shape constant or a
    channel shuffle cannot express, are left alone and noted.

    Criteria: `l1`/`l2` norm of the producers' output filters, `bn_scale` (|gamma| of the
    BatchNorms the channels flow through; l1 where there is none), `activation` (mean
    |activation| on calibration data), `apoz` (fraction of zeros after the activation;
    channels that are mostly zero go first) and `refit` (the channels whose loss the
    re-fitted next layers make up for best: least-squares backward elimination on
    calibration data, He et al. 2017 / ThiNet; l1 for a group no such layer reads). The
    last three need calibration data.

    With `reconstruct` and calibration data, each layer that reads pruned channels is
    re-fitted so that its output matches the original model's (AIMET / He et al. 2017);
    without data the pass prunes anyway and says so. Per-layer notes give the channel
    and parameter counts and the output relative error before and after the re-fit
    (without data: the relative norm of the removed weights).
    """

    name = "prune_channels"
    lossless = False
    params = (
        Param(
            "ratio",
            "float",
            REQUIRED,
            "fraction of each group's channels to remove, in [0, 1)",
            low=0.0,
            high=1.0,
            search=(0.1, 0.75),
        ),
        Param(
            "criterion",
            "choice",
            "l1",
            "how channels are ranked: l1, l2, bn_scale, activation, apoz or refit (the last three "
            "need data)",
            choices=CRITERIA,
            search=("l1", "bn_scale", "activation", "refit"),
        ),
        Param("round_to", "int", 1, "keep a multiple of this many channels per group", low=1),
        Param("min_channels", "int", 1, "keep at least this many channels per group", low=1),
        Param(
            "reconstruct",
            "bool",
            True,
            "re-fit the layers after each pruned group by least squares on calibration data",
        ),
    )

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self.config["ratio"] >= 1.0:
            raise ParameterError(
                f"pass {self.name}: parameter ratio={self.config['ratio']} must be below 1 "
                "(a group cannot lose all its channels)"
            )

    # -- planning --------------------------------------------------------------
    def _keep_count(self, size: int, blocks: int = 1) -> tuple[int, str | None]:
        """How many of `size` channels to keep, or why none can go."""
        unit = math.lcm(self.config["round_to"], blocks)
        if size % blocks:
            return size, f"{size} channels do not split into {blocks} equal blocks"
        keep = math.ceil(round(size * (1.0 - self.config["ratio"]), 9) / unit) * unit
        keep = max(keep, math.ceil(self.config["min_channels"] / unit) * unit)
        if keep >= size:
            return size, (
                f"nothing to remove: keeping {min(keep, size)} of {size} channels "
                f"(ratio={self.config['ratio']}, round_to={self.config['round_to']}, "
                f"min_channels={self.config['min_channels']}, blocks={blocks})"
            )
        return keep, None

    def _plan(
        self,
        candidates: list[ChannelGroup],
        scored: dict[int, tuple[np.ndarray, str]],
        notes: dict[str, dict[str, Any]],
    ) -> list[_Plan]:
        """Chooses the channels to remove: per group, or per linked unit across groups."""
        plans = []
        linked = _linked_units(candidates)
        done: set[int] = set()
        by_id = {g.id: g for g in candidates}
        for gids, units, pinned in linked:
            if any(by_id[i].blocks > 1 for i in gids):
                continue  # planned alone below; the layout check then says why it cannot go
            done.update(gids)
            keep, why = self._keep_count(len(units))
            free = [u for u in range(len(units)) if u not in pinned]
            if why is None and len(units) - keep > len(free):
                keep, why = len(units), "the channels laid out with fixed ones cannot go"
            if why is not None:
                for i in gids:
                    for p in by_id[i].producers:
                        _skip(notes, p, f"group {i} (linked with {sorted(set(gids) - {i})}): {why}")
                continue
            score = np.array([sum(scored[g][0][label] for g, label in units[u]) for u in free])
            gone = [free[k] for k in np.argsort(score, kind="stable")[: len(units) - keep]]
            for i in gids:
                removed = sorted(label for u in gone for g, label in units[u] if g == i)
                if removed:
                    plans.append(_Plan(by_id[i], np.asarray(removed, np.int64), scored[i][1]))
        for g in candidates:
            if g.id in done:
                continue
            keep, why = self._keep_count(g.size, g.blocks)
            if why is not None:
                for p in g.producers:
                    _skip(notes, p, f"group {g.id}: {why}")
                continue
            plans.append(_Plan(g, _choose(scored[g.id][0], keep, g.blocks), scored[g.id][1]))
        return plans

    def _refit_scores(
        self,
        model: Model,
        candidates: list[ChannelGroup],
        data: Mapping[str, np.ndarray],
        seed: int,
    ) -> dict[int, tuple[np.ndarray, str]]:
        """Scores by least-squares backward elimination over each group's readers."""
        readers = sorted({c for g in candidates for c in g.consumers})
        sample = {k: np.asarray(v)[:_MAX_SAMPLES] for k, v in data.items()}
        normals = gather_normals(model, readers, sample, seed)
        scored = {}
        for g in candidates:
            keep, _ = self._keep_count(g.size, g.blocks)
            scores = elimination_scores(g, normals, g.size - keep)
            if scores is None:  # no reader the selection can model: rank by the filters
                scored[g.id] = _importance(model, g, "l1", {})
            else:
                scored[g.id] = (scores, "refit")
        return scored

    def run(self, model: Model, context: PassContext) -> PassResult:
        criterion = self.config["criterion"]
        data = context.calibration or None
        if criterion in _DATA_CRITERIA:
            data = context.require_calibration(f"{self.name}(criterion={criterion})")
        # Shapes left by an earlier pass may be stale; the dependency view reads them.
        refresh_shapes(model)
        dg = dependency_graph(model)
        notes: dict[str, dict[str, Any]] = defaultdict(dict)
        candidates: list[ChannelGroup] = []
        for g in dg.groups:
            if not any(self.selects(model, model.node(p)) for p in g.producers):
                continue
            if not g.prunable:
                for p in g.producers:
                    _skip(notes, p, f"group {g.id} is fixed: {'; '.join(g.reasons[:2])}")
                continue
            keep, why = self._keep_count(g.size, g.blocks)
            if why is not None:
                for p in g.producers:
                    _skip(notes, p, f"group {g.id}: {why}")
                continue
            candidates.append(g)
        if not candidates:
            return PassResult(model, False, [], dict(notes))
        stats: dict[str, np.ndarray] = {}
        if criterion in ("activation", "apoz"):
            names = sorted({p for g in candidates for p in g.producers})
            sample = {k: np.asarray(v)[: 4 * _MAX_SAMPLES] for k, v in data.items()}  # type: ignore[union-attr]
            stats = _activation_stats(model, sample, names)
        if criterion == "refit":
            scored = self._refit_scores(model, candidates, data, context.seed)  # type: ignore[arg-type]
        else:
            scored = {g.id: _importance(model, g, criterion, stats) for g in candidates}
        plans = self._plan(candidates, scored, notes)
        if not plans:
            return PassResult(model, False, [], dict(notes))
        pruned, removal, plans = self._apply(model, plans, notes)
        if not plans:
            return PassResult(model, False, [], dict(notes))
        changes = self._report(model, pruned, plans, removal, notes)
        order = {n.name: i for i, n in enumerate(pruned.nodes)}
        readers = sorted(removal.in_keep, key=order.__getitem__)
        if data is not None:
            refit = bool(self.config["reconstruct"])
            found = _reconstruct(
                model, pruned, readers, removal.out_keep, data, context.seed, refit
            )
            for name, note in found.items():
                notes[name].update(note)
                if note.get("reconstructed"):
                    changes.append(
                        f"re-fitted {name}: output rel. error {note['rel_error_before']:.2e} -> "
                        f"{note['rel_error']:.2e} ({note['rows']:,} rows)"
                    )
                elif "reconstructed" in note:
                    changes.append(
                        f"{name}: output rel. error {note['rel_error']:.2e}; re-fit not kept "
                        f"(held-out error would be {note['rel_error_refit']:.2e})"
                    )
                elif "rel_error" in note:
                    changes.append(f"{name}: output rel. error {note['rel_error']:.2e} (no re-fit)")
                else:
                    changes.append(f"{name} not re-fitted: {note['not_reconstructed']}")
        elif self.config["reconstruct"]:
            logger.warning("%s: no calibration data, pruning without reconstruction", self.name)
            changes.append(
                "no calibration data: pruned without reconstruction "
                "(pass --data FILE.npz to re-fit the layers after each pruned group)"
            )
        pruned.cleanup()
        s0, s1 = summarize(model), summarize(pruned)
        macs = (
            f", MACs {_fmt(s0.macs)} -> {_fmt(s1.macs)}"
            if s0.macs is not None and s1.macs is not None
            else ""
        )
        changes.insert(
            0,
            f"pruned {len(plans)} channel group(s): params {_fmt(s0.params)} -> {_fmt(s1.params)}{macs}",
        )
        return PassResult(pruned, True, changes, dict(notes))

    def _apply(
        self, model: Model, plans: list[_Plan], notes: dict[str, dict[str, Any]]
    ) -> tuple[Model, _Removal, list[_Plan]]:
        """Prunes the plans' groups on a copy; drops groups that cannot be expressed."""
        try:
            observed = _observe(model)
        except TailorError as e:
            # Without a run, run-time shape arithmetic cannot be checked: such groups stop.
            logger.info("%s: checking inferred shapes only (%s)", self.name, e)
            observed = _inferred(model)
        while plans:
            removal = _Removal.build(plans)
            problems = list(removal.problems)
            work = model.copy()
            if not problems:
                surgeon = _Surgeon(work, removal, observed)
                problems = surgeon.apply()
            if not problems:
                problems = _verify(work, removal, observed, surgeon.expectations)
            if not problems:
                return work, removal, plans
            dropped: set[int] = set()
            for ids, reason in problems:
                for plan in plans:
                    if plan.group.id in ids and plan.group.id not in dropped:
                        dropped.add(plan.group.id)
                        for p in plan.group.producers:
                            _skip(notes, p, f"group {plan.group.id}: {reason}")
                        logger.info("%s: skipping group %d: %s", self.name, plan.group.id, reason)
            if not dropped:  # pragma: no cover - a problem that names no planned group
                raise PassError(f"pass {self.name}: {problems[0][1]}")
            plans = [p for p in plans if p.group.id not in dropped]
        return model, _Removal(), []

    def _report(
        self,
        before: Model,
        after: Model,
        plans: list[_Plan],
        removal: _Removal,
        notes: dict[str, dict[str, Any]],
    ) -> list[str]:
        old = {layer.name: layer for layer in layers(before)}
        new = {layer.name: layer for layer in layers(after)}
        changes = []
        for plan in plans:
            g = plan.group
            for p in g.producers:
                notes[p].update(
                    {
                        "group": g.id,
                        "criterion": plan.criterion,
                        "channels_before": g.size,
                        "channels_after": g.size - len(plan.removed),
                    }
                )
        for name in [n.name for n in after.nodes]:
            if name not in removal.out_keep and name not in removal.in_keep:
                continue
            a, b = old[name], new[name]
            note = notes[name]
            note.update({"params_before": a.params, "params_after": b.params})
            parts = []
            if name in removal.out_keep:
                parts.append(f"{a.out_channels} -> {b.out_channels} output channels")
                note["out_channels"] = [a.out_channels, b.out_channels]
            if name in removal.in_keep:
                parts.append(f"{a.in_channels} -> {b.in_channels} inputs")
                note["in_channels"] = [a.in_channels, b.in_channels]
            # Without data the error is measured in weight space: the norm of what went.
            w = layer_weight(before, old[name].node)[1].astype(np.float64)  # type: ignore[index]
            kept = _weight_mask(
                old[name].node, w, removal.out_keep.get(name), removal.in_keep.get(name)
            )
            total = float(np.linalg.norm(w))
            note["weight_rel_error"] = float(np.linalg.norm(w[~kept])) / total if total else 0.0
            group_ids = sorted(removal.owners.get(name, ()))
            changes.append(
                f"pruned {name} (group {', '.join(map(str, group_ids))}): {', '.join(parts)}, "
                f"{_fmt(a.params)} -> {_fmt(b.params)} params"
            )
        return changes
