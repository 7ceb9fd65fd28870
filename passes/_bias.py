"""Empirical bias correction, shared by every pass that perturbs weights (the
factorizations and `quantize`): shifts each output channel of a perturbed layer by its
mean error `E[y - y']` on calibration data, so its mean matches the reference model.

A lossy rewrite of a weight usually shifts the mean of the layer's output per channel
(`ΔW · E[x]`, Nagel et al. 2019, "Data-free quantization through weight equalization
and bias correction"); after a ReLU that bias does not average out. Measuring the shift
on data rather than computing it from `ΔW` also catches what the rewrite does to the
layer's input (an upstream layer, quantized activations) and works for any chain of
factors. Layers are corrected in dependency order, so an error that propagates is
corrected once, where it arises.

The shift goes where it costs nothing at run time: into the float bias of the producing
Conv/ConvTranspose/Gemm (created when absent), into the int32 bias behind a
DequantizeLinear of a QDQ layer (kept int32 at the scale onnxruntime fuses), into the
constant of the Add that carries a MatMul's bias, or else into a new Add after the
producer.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tailor.ir.layers import layer_weight
from tailor.ir.model import Model, Node, Tensor, Variable
from tailor.passes._capture import MAX_SAMPLES, capture_each, subset

__all__ = [
    "BiasShift",
    "add_channel_shift",
    "channel_axis",
    "correct_bias",
    "delta_shape",
]

logger = logging.getLogger(__name__)


@dataclass
class BiasShift:
    """One bias correction: `delta` (per channel, along `axis` of `tensor`) was added to
    the bias or constant of `node`, which grew by `added_params` (a bias created where
    there was none)."""

    tensor: str
    axis: int
    delta: np.ndarray
    node: str
    added_params: int = 0


def channel_axis(model: Model, node: Node) -> int | None:
    """The output channel axis of a layer: 1 for Conv/ConvTranspose, -1 for Gemm and
    `x @ W`, -2 for `W @ x`; None for other ops."""
    if node.op in ("Conv", "ConvTranspose"):
        return 1
    if node.op == "Gemm":
        return -1
    if node.op == "MatMul":
        found = layer_weight(model, node)
        return -2 if found is not None and found[0] == 0 else -1
    return None


def delta_shape(delta: np.ndarray, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along a negative `axis`."""
    return (delta.size,) + (1,) * (-axis - 1)


class _ChannelSums:
    """A `capture` reducer keeping per-channel sums (and counts) instead of activations."""

    def __init__(self, axes: Mapping[str, int]):
        self.axes = dict(axes)
        self.counts: dict[str, int] = defaultdict(int)
        self.ndim: dict[str, int] = {}

    def __call__(self, name: str, batch: np.ndarray) -> np.ndarray:
        axis = self.axes[name] % batch.ndim
        self.ndim[name] = batch.ndim
        moved = np.moveaxis(np.asarray(batch, np.float64), axis, -1)
        channels = moved.shape[-1]
        self.counts[name] += moved.size // max(channels, 1)
        return moved.reshape(-1, channels).sum(axis=0)[None, :]

    def means(self, gathered: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: gathered[n].sum(axis=0) / max(self.counts[n], 1) for n in self.axes}


def _levels(model: Model, tensors: set[str]) -> dict[str, int]:
    """Level of each listed tensor: 0 when no other listed tensor is upstream of it, else
    1 + the largest level upstream. Tensors of one level do not depend on each other's
    corrections, so they are measured in the same run."""
    reach: dict[str, int] = {}
    levels: dict[str, int] = {}
    for node in model.nodes:
        upstream = max((reach.get(t.name, -1) for t in node.inputs), default=-1)
        for o in node.outputs:
            if o.name in tensors:
                levels[o.name] = upstream + 1
                reach[o.name] = upstream + 1
            else:
                reach[o.name] = upstream
    return levels


def _upstream(model: Model, names: list[str]) -> Model:
    """A copy computing only the named tensors: what is downstream of them is dropped,
    so measuring the early layers does not run the whole network."""
    probe = model.copy()
    tensors = probe.tensors()
    probe.graph.outputs = [tensors[n] for n in names]
    return probe.cleanup()


# ---------------------------------------------------------------------- where a shift goes
def _set_bias(node: Node, tensor: Tensor) -> None:
    if len(node.inputs) > 2:  # present, or an empty name standing for "absent"
        node.inputs[2] = tensor
    else:
        node.inputs.append(tensor)


def _qdq_bias_scale(model: Model, node: Node) -> np.ndarray | None:
    """Input scale times weight scale, the scale onnxruntime gives the int32 bias of a
    QDQ layer; None unless both inputs come from DequantizeLinear with constant scales."""
    scales = []
    for t in node.inputs[:2]:
        dq = model.producer(t)
        if dq is None or dq.op != "DequantizeLinear":
            return None
        s = model.constant_value(dq.inputs[1])
        if s is None:
            return None
        scales.append(np.asarray(s, np.float64).reshape(-1))
    return scales[0] * scales[1]


def _int32_dequantized(
    model: Model, node: Node, q: np.ndarray, like: Node | None, scale: np.ndarray | None
) -> Tensor:
    """A DequantizeLinear of a new int32 constant `q`: with the scale (and zero point)
    inputs of `like`, or a new constant `scale`."""
    inputs: list[Tensor] = [model.add_constant(f"{node.name}_bias_corrected", q)]
    if like is not None:
        inputs.extend(t for t in like.inputs[1:])
        attrs = dict(like.attrs)
    else:
        assert scale is not None
        inputs.append(model.add_constant(f"{node.name}_bias_scale", scale.astype(np.float32)))
        attrs = {"axis": 0} if scale.size > 1 else {}
    dq = model.add_node(
        "DequantizeLinear", inputs, name=f"{node.name}_bias_dequantize", attrs=attrs, domain=""
    )
    dq.outputs[0].dtype = np.float32
    return dq.outputs[0]


def _round_int32(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), -(2**31), 2**31 - 1).astype(np.int32)


def _shift_layer_bias(
    model: Model, node: Node, tensor: Variable, delta: np.ndarray
) -> tuple[str, int] | str:
    """Adds `delta` to the bias of a Conv/ConvTranspose/Gemm; the reason when it cannot.

    Gemm's `beta` is folded into the new bias and set to 1. Constants are replaced,
    never mutated, so a bias shared with other nodes stays as it was for them.
    """
    beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    present = len(node.inputs) > 2 and not node.inputs[2].is_empty()
    if not present:
        scale = _qdq_bias_scale(model, node)
        if scale is not None:
            new: Tensor = _int32_dequantized(model, node, _round_int32(delta / scale), None, scale)
        else:
            dtype = tensor.dtype or np.float32
            new = model.add_constant(f"{node.name}_bias_corrected", delta.astype(dtype))
        added = int(delta.size)
    else:
        bias = node.inputs[2]
        value = model.constant_value(bias)
        dq = model.producer(bias)
        if value is not None and np.issubdtype(value.dtype, np.floating):
            base = value.astype(np.float64)
            # A Conv bias is (C,); a Gemm's C broadcasts, and every legal C shape stays
            # legal: (N,), (1, N), (M, 1), (M, N), ().
            shifted = base.reshape(-1) + delta if node.op != "Gemm" else beta * base + delta
            new = model.add_constant(f"{node.name}_bias_corrected", shifted.astype(value.dtype))
            added = int(shifted.size - value.size)
        elif dq is not None and dq.op == "DequantizeLinear":
            q, step = (model.constant_value(t) for t in dq.inputs[:2])
            has_zero = len(dq.inputs) > 2 and not dq.inputs[2].is_empty()
            zero = model.constant_value(dq.inputs[2]) if has_zero else None
            if (
                q is None
                or step is None
                or q.dtype != np.int32
                or (has_zero and (zero is None or np.any(zero)))
            ):
                return "its quantized bias is not an int32 constant without zero point"
            step64 = np.asarray(step, np.float64).reshape(-1)
            shifted_q = beta * q.astype(np.float64).reshape(-1) + delta / step64
            new = _int32_dequantized(
                model, node, _round_int32(shifted_q).reshape(q.shape), dq, None
            )
            added = 0
        else:
            return "its bias is computed at run time"
    _set_bias(node, new)
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
    model.toposort()
    return node.name, added


def _shift_matmul_add(
    model: Model, node: Node, tensor: Variable, delta: np.ndarray, axis: int, ndim: int
) -> tuple[str, int] | None:
    """Shifts the constant of the Add that carries a MatMul's bias (as exported), if any."""
    if model.is_graph_output(tensor) or len(tensor.outputs) != 1:
        return None
    add = tensor.outputs[0]
    if add.op != "Add" or sum(t is tensor for t in add.inputs) != 1:
        return None
    other = add.inputs[1] if add.inputs[0] is tensor else add.inputs[0]
    value = model.constant_value(other)
    if value is None or not np.issubdtype(value.dtype, np.floating):
        return None
    shifted = value.astype(np.float64) + delta.reshape(delta_shape(delta, axis))
    if shifted.ndim > ndim:  # a constant of higher rank than the activation would reshape it
        return None
    const = model.add_constant(f"{add.name}_bias_corrected", shifted.astype(value.dtype))
    add.inputs[add.inputs.index(other)] = const
    return add.name, int(shifted.size - value.size)


def _add_after(
    model: Model, node: Node, tensor: Variable, delta: np.ndarray, axis: int
) -> tuple[str, int]:
    """A new Add after `node`, which takes over `tensor` so its name (maybe a graph
    output) is kept."""
    dtype = tensor.dtype or np.float32
    inner = Variable(model.unique_name(f"{tensor.name}_uncorrected"), dtype=dtype)
    node.outputs[node.outputs.index(tensor)] = inner
    const = model.add_constant(
        f"{node.name}_bias_correction", delta.reshape(delta_shape(delta, axis)).astype(dtype)
    )
    attrs = {"broadcast": 1} if model.opset < 7 else {}
    add = model.add_node(
        "Add", [inner, const], name=f"{node.name}_bias_correction", attrs=attrs, outputs=[tensor]
    )
    model.toposort()
    return add.name, int(delta.size)


def add_channel_shift(
    model: Model,
    tensor_name: str,
    delta: np.ndarray,
    axis: int,
    ndim: int,
    *,
    insert_add: bool = True,
) -> tuple[str, int] | str:
    """Adds `delta` per channel along the negative `axis` to what produces `tensor_name`
    (an activation of rank `ndim`), in place.

    Args:
        insert_add: where no bias can take the shift, add an Add node after the
            producer; when False, return the reason instead (a QDQ graph keeps its
            fusable pattern).

    Returns:
        `(node, added_params)`: the node shifted and the parameters it gained; or the
        reason the shift was not applied.
    """
    tensor = model.tensor(tensor_name)
    node = model.producer(tensor)
    if node is None:
        return "it is not computed by a node"
    reason = f"{node.op} has no bias input"
    if node.op == "MatMul":
        done = _shift_matmul_add(model, node, tensor, delta, axis, ndim)
        if done is not None:
            return done
    elif node.op in ("Conv", "ConvTranspose", "Gemm"):
        found = _shift_layer_bias(model, node, tensor, delta)
        if not isinstance(found, str):
            return found
        reason = found
    if not insert_add:
        return reason
    return _add_after(model, node, tensor, delta, axis)


def correct_bias(
    before: Model,
    after: Model,
    pairs: Mapping[str, str],
    calibration: Mapping[str, np.ndarray],
    *,
    axes: Mapping[str, int] | None = None,
    max_samples: int = MAX_SAMPLES,
    insert_add: bool = True,
) -> dict[str, BiasShift | str]:
    """Empirical bias correction: shifts each listed output of `after` per channel so that
    its mean over the calibration data equals the same tensor's mean in `before`.

    Layers are corrected in dependency order (a layer is measured after every corrected
    layer upstream of it has been shifted), so errors that propagate are not corrected
    twice. Where each shift goes: see :func:`add_channel_shift`. `after` is edited in
    place; constants are replaced, never mutated, so weights shared with other nodes
    stay as they were.

    Args:
        before: the reference model (not modified).
        after: the perturbed model (factorized, quantized, ...), same inputs.
        pairs: tensor of `after` -> tensor of `before` it should match.
        calibration: arrays named like the models' inputs.
        axes: channel axis per tensor of `after`; by default from its producer (see
            :func:`channel_axis`), required for producers that are not layers.
        max_samples: calibration samples used.
        insert_add: see :func:`add_channel_shift`.

    Returns:
        By tensor of `after`: the shift applied, or the reason it was left as is.
    """
    data = subset(calibration, max_samples)
    if not data or not pairs:
        return {}
    resolved: dict[str, int] = {}
    for name in pairs:
        axis = (axes or {}).get(name)
        if axis is None:
            producer = after.producer(after.tensor(name))
            axis = channel_axis(after, producer) if producer is not None else None
        if axis is None:
            raise ValueError(f"correct_bias: no channel axis known for tensor {name!r}")
        resolved[name] = axis
    ref_axes = {pairs[n]: resolved[n] for n in pairs}
    ref_sums = _ChannelSums(ref_axes)
    ref_means = ref_sums.means(capture_each(before, data, sorted(ref_axes), ref_sums))
    levels = _levels(after, set(pairs))
    shifts: dict[str, BiasShift | str] = {}
    for level in sorted(set(levels.values())):
        names = sorted(n for n in pairs if levels.get(n) == level)
        sums = _ChannelSums({n: resolved[n] for n in names})
        means = sums.means(capture_each(_upstream(after, names), data, names, sums))
        for name in names:
            delta = ref_means[pairs[name]] - means[name]
            axis = resolved[name]
            if axis >= 0:  # negative axes broadcast whatever the batch rank
                axis -= sums.ndim[name]
            if axis < -sums.ndim[name]:
                shifts[name] = f"{name} has no axis {axis}"
                logger.info("correct_bias: %s has no axis %d, left as is", name, axis)
                continue
            done = add_channel_shift(
                after, name, delta, axis, sums.ndim[name], insert_add=insert_add
            )
            if isinstance(done, str):
                shifts[name] = done
                continue
            shifts[name] = BiasShift(name, axis, delta, done[0], done[1])
    after.cleanup()
    return shifts
