"""Least-squares reconstruction after channel pruning (He et al. 2017, AIMET): the
layers that read pruned channels are re-fitted, round by round in topological order, so
that their outputs on calibration data match the original model's.

Rows are gathered from the pruned model's own activations (so each re-fit also corrects
the error of the layers before it) and from the original model's outputs; `_Runner`
caches what is final between rounds so each node runs about once.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tailor.ir.activations import capture
from tailor.ir.layers import layer_weight
from tailor.ir.model import Model, Node
from tailor.passes._lstsq import (
    conv_geometry,
    conv_patches,
    refit_linear,
    rel_error,
    sample_positions,
)

__all__: list[str] = []

logger = logging.getLogger(__name__)

#: Calibration samples and sampled rows used per re-fitted layer; bounds time and memory.
_MAX_SAMPLES = 128
_BATCH = 64  # samples per onnxruntime call, unless the model fixes its batch size
_MAX_ROWS = 20_000
#: Wide layers get fewer rows: the Gram matrix costs rows * d^2 (d input features), kept
#: under _GRAM_BUDGET, but never fewer than _MIN_ROWS rows; the design matrix stays under
#: _MAX_ELEMENTS entries.
_GRAM_BUDGET = 4_000_000_000
_MIN_ROWS = 4096
_MAX_ELEMENTS = 20_000_000
#: Layers with more input features than this are not re-fitted (a d x d Gram matrix).
_MAX_FEATURES = 8192
#: Ridge strength, relative to the mean input energy.
_RIDGE = 1e-3


def _batch_size(model: Model) -> int:
    """Samples per onnxruntime call: a model exported with a fixed batch gets exactly it."""
    for t in model.inputs:
        shape = model.shape(t)
        if shape and isinstance(shape[0], int) and shape[0] > 0:
            return shape[0]
    return _BATCH


@dataclass
class _Fit:
    """One layer to re-fit, and the rows gathered for it."""

    name: str
    index: int
    x_name: str
    y_name: str
    out_keep: np.ndarray | None
    features: int
    conv: tuple[list[int], dict] | None = None  # kernel and attributes of a Conv
    positions: dict[int, np.ndarray] = field(default_factory=dict)
    x: list[np.ndarray] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)


class _Collector:
    """A `capture` reducer: keeps only the sampled rows each fit needs, batch by batch."""

    def __init__(self, fits: list[_Fit], side: str, total: int, seed: int):
        self.side, self.total, self.seed = side, total, seed
        self.by_tensor: dict[str, list[_Fit]] = defaultdict(list)
        for fit in fits:
            self.by_tensor[fit.x_name if side == "x" else fit.y_name].append(fit)
        self.batch: dict[str, int] = defaultdict(int)
        self.offset: dict[str, int] = defaultdict(int)

    def __call__(self, name: str, value: np.ndarray) -> np.ndarray:
        b, offset = self.batch[name], self.offset[name]
        self.batch[name] += 1
        self.offset[name] += len(value)
        for fit in self.by_tensor[name]:
            geometry = None
            if fit.conv is not None and self.side == "x":
                geometry = conv_geometry(fit.conv[1], value.shape[2:], fit.conv[0])
            # Rows are output positions: spatial for a Conv, leading axes otherwise.
            if fit.conv is None:
                space = tuple(value.shape[1:-1])
            else:
                space = tuple(value.shape[2:]) if geometry is None else tuple(geometry[-1])
            if b not in fit.positions:
                # Wide layers get fewer rows, so one design matrix stays bounded in memory.
                d = fit.features
                budget = min(_MAX_ROWS, _MAX_ELEMENTS // d, max(_MIN_ROWS, _GRAM_BUDGET // d**2))
                count = math.ceil(budget * len(value) / self.total)
                fit.positions[b] = sample_positions(
                    len(value) * math.prod(space), count, (self.seed, fit.index, b)
                )
            pos = fit.positions[b]
            if self.side == "y":
                rows = np.moveaxis(value, 1, -1) if fit.conv is not None else value
                rows = rows.reshape(-1, rows.shape[-1])[pos]
                if fit.out_keep is not None:
                    rows = rows[:, fit.out_keep]
                fit.y.append(rows.astype(np.float32))
                fit.samples.append(offset + pos // max(math.prod(space), 1))
            elif geometry is not None:
                strides, dilations, begin, end, out_spatial = geometry
                patches = conv_patches(
                    value,
                    pos,
                    kernel=fit.conv[0],  # type: ignore[index]
                    strides=strides,
                    dilations=dilations,
                    pads_begin=begin,
                    pads_end=end,
                    out_spatial=out_spatial,
                )
                fit.x.append(patches.reshape(len(pos), value.shape[1], -1).astype(np.float32))
            else:
                fit.x.append(value.reshape(-1, value.shape[-1])[pos].astype(np.float32))
        return np.empty((0,))


def _fit_spec(model: Model, name: str, index: int, out_keep: np.ndarray | None) -> _Fit | str:
    """What re-fitting `name` needs, or why it cannot be re-fitted."""
    node = model.node(name)
    widx, w = layer_weight(model, node)  # type: ignore[misc]
    if node.op == "ConvTranspose":
        return "ConvTranspose layers are not re-fitted"
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA is not re-fitted"
    if node.op == "MatMul" and (widx != 1 or w.ndim != 2):
        return "only MatMul with a 2-D weight second is re-fitted"
    if len(node.inputs) > 2 and node.inputs[2].name:
        c = model.constant_value(node.inputs[2])
        if c is None:
            return "its bias is computed at run time"
        if node.op == "Gemm" and c.size > 1 and c.squeeze().ndim > 1:
            return "its Gemm bias is not a per-output vector"
    if node.op == "Conv":
        per_output, features = w[0].size, w.shape[1] * int(node.attrs.get("group", 1))
        features *= math.prod(w.shape[2:])
    elif node.op == "Gemm":
        per_output = features = w.shape[1] if node.attrs.get("transB", 0) else w.shape[0]
    else:
        per_output = features = w.shape[0]
    if per_output > _MAX_FEATURES:
        return f"{per_output} input features per output are too many for a least-squares re-fit"
    x = node.inputs[1 - widx] if node.op == "MatMul" else node.inputs[0]
    fit = _Fit(name, index, x.name, node.outputs[0].name, out_keep, features)
    if node.op == "Conv":
        fit.conv = ([int(k) for k in w.shape[2:]], dict(node.attrs))
    return fit


def _solve(model: Model, fit: _Fit, node: Node) -> tuple[float, float, bool]:
    """Re-fits one layer from its gathered rows; returns (error before, after, kept)."""
    x = np.concatenate(fit.x).astype(np.float64)
    y = np.concatenate(fit.y).astype(np.float64)
    samples = np.concatenate(fit.samples)
    n_samples = len(np.unique(samples))
    held = samples % 5 == 4 if n_samples >= 5 else np.arange(len(samples)) % 5 == 4
    train = ~held if held.any() and (~held).any() else np.ones(len(samples), bool)
    if not held.any():
        held = train
    widx, w = layer_weight(model, node)  # type: ignore[misc]
    dtype = w.dtype
    if node.op == "Conv":
        groups = int(node.attrs.get("group", 1))
        bias = (
            model.constant_value(node.inputs[2])
            if len(node.inputs) > 2 and node.inputs[2].name
            else None
        )
        b = np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64)
        cout, cin_g = w.shape[0], w.shape[1]
        rows_g = cout // groups
        new_w, new_b = np.array(w, np.float64), b.copy()
        num0 = num1 = den = 0.0
        for g in range(groups):
            xs = x[:, g * cin_g : (g + 1) * cin_g].reshape(len(x), -1)
            ys = y[:, g * rows_g : (g + 1) * rows_g]
            w0 = w[g * rows_g : (g + 1) * rows_g].reshape(rows_g, -1).T.astype(np.float64)
            b0 = b[g * rows_g : (g + 1) * rows_g]
            wf, bf = refit_linear(xs[train], ys[train], w0, b0, ridge=_RIDGE)
            e0 = rel_error(xs[held], ys[held], w0, b0)
            e1 = rel_error(xs[held], ys[held], wf, bf)
            scale = float(np.linalg.norm(ys[held]))
            num0, num1, den = num0 + (e0 * scale) ** 2, num1 + (e1 * scale) ** 2, den + scale**2
            new_w[g * rows_g : (g + 1) * rows_g] = wf.T.reshape((rows_g,) + w.shape[1:])
            new_b[g * rows_g : (g + 1) * rows_g] = bf  # type: ignore[assignment]
        err0 = math.sqrt(num0 / den) if den else 0.0
        err1 = math.sqrt(num1 / den) if den else 0.0
        if err1 >= err0:
            return err0, err1, False
        node.inputs[1] = model.add_constant(f"{node.name}_w_refit", new_w.astype(dtype))
        bias_const = model.add_constant(f"{node.name}_bias_refit", new_b.astype(dtype))
        if len(node.inputs) > 2:
            node.inputs[2] = bias_const
        else:
            node.inputs.append(bias_const)
        return err0, err1, True
    if node.op == "Gemm":
        trans_b = bool(node.attrs.get("transB", 0))
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        w0 = alpha * (w.T if trans_b else w).astype(np.float64)
        c = (
            model.constant_value(node.inputs[2])
            if len(node.inputs) > 2 and node.inputs[2].name
            else None
        )
        b0 = (
            np.zeros(w0.shape[1])
            if c is None
            else np.broadcast_to(beta * c.astype(np.float64).reshape(-1), (w0.shape[1],))
        )
        wf, bf = refit_linear(x[train], y[train], w0, b0, ridge=_RIDGE)
        err0, err1 = rel_error(x[held], y[held], w0, b0), rel_error(x[held], y[held], wf, bf)
        if err1 >= err0:
            return err0, err1, False
        node.inputs[1] = model.add_constant(
            f"{node.name}_w_refit", (wf.T if trans_b else wf).astype(dtype)
        )
        bias_const = model.add_constant(f"{node.name}_bias_refit", np.asarray(bf).astype(dtype))
        node.attrs["alpha"], node.attrs["beta"] = 1.0, 1.0
        if len(node.inputs) > 2:
            node.inputs[2] = bias_const
        else:
            node.inputs.append(bias_const)
        return err0, err1, True
    # MatMul: no bias of its own, so no intercept (a following Add is another node)
    w0 = w.astype(np.float64)
    wf, _ = refit_linear(x[train], y[train], w0, None, ridge=_RIDGE, fit_intercept=False)
    err0, err1 = rel_error(x[held], y[held], w0, None), rel_error(x[held], y[held], wf, None)
    if err1 >= err0:
        return err0, err1, False
    node.inputs[widx] = model.add_constant(f"{node.name}_w_refit", wf.astype(dtype))
    return err0, err1, True


class _Runner:
    """Runs a model round by round on calibration data, resuming from cached activations.

    After a round, every node upstream of the tensors it computed is final (no pending
    re-fit is among them), so the activations crossing from that part of the graph to
    the rest are kept, and the next round runs only the nodes between that cut and the
    tensors it needs: each node runs about once over the whole reconstruction. Shape
    arithmetic (`Shape` and what is computed from it) has no sample axis and depends on
    the batch size, so it is never cached: it reruns in every round from the activations
    it reads.
    """

    def __init__(self, model: Model, feeds: dict[str, np.ndarray]):
        self.model = model
        self.feeds = dict(feeds)
        self.known = dict(feeds)
        self.done: set[str] = set()
        self.samples = len(next(iter(feeds.values())))
        self.batch = _batch_size(model)
        self.shape_only: set[str] = set()
        for node in model.nodes:  # topological order
            if node.op in ("Shape", "Size") or all(
                model.constant_value(t) is not None or t.name in self.shape_only
                for t in node.inputs
                if t.name
            ):
                self.shape_only.update(t.name for t in node.outputs if t.name)

    def run(self, names: list[str], reduce: Callable[[str, np.ndarray], np.ndarray]) -> None:
        """Passes each tensor in `names`, batch by batch, to `reduce`."""
        model = self.model
        producers = {t.name: n for n in model.nodes for t in n.outputs}
        done = set(self.done)
        stack = [n for n in names if n not in self.known]
        while stack:
            node = producers.get(stack.pop())
            if node is None or node.name in done or node.outputs[0].name in self.shape_only:
                continue
            done.add(node.name)
            stack.extend(t.name for t in node.inputs if t.name and t.name not in self.known)
        # The new cut: final tensors that some node not yet final still reads.
        cut = {
            t.name
            for n in model.nodes
            if n.name not in done
            for t in n.inputs
            if t.name
            and t.name not in self.shape_only
            and model.constant_value(t) is None
            and (t.name in self.known or getattr(producers.get(t.name), "name", None) in done)
        }
        wanted = sorted((set(names) | cut) - set(self.known))
        values: dict[str, np.ndarray] = {}
        if wanted:
            sub = model.copy()
            tensors = sub.tensors()
            for name in self.known:
                tensors[name].inputs.clear()  # computed already: an input of the cut graph
            sub.graph.inputs = [tensors[n] for n in sorted(self.known)]
            sub.graph.outputs = [tensors[n] for n in wanted]
            sub.cleanup()
            sub.graph.inputs = [t for t in sub.graph.inputs if t.outputs]
            feeds = {t.name: self.known[t.name] for t in sub.graph.inputs}

            def keep(name: str, batch: np.ndarray) -> np.ndarray:
                if name in names:
                    reduce(name, batch)
                return batch if name in cut else np.empty((0,))

            values = capture(sub, feeds, wanted, reduce=keep, batch_size=self.batch)
        for name in names:
            if name in self.known:  # already cached: replay it in batches
                for start in range(0, len(self.known[name]), self.batch):
                    reduce(name, self.known[name][start : start + self.batch])
        known = {n: self.known[n] if n in self.known else values[n] for n in cut}
        if all(len(v) == self.samples for v in known.values()):
            self.known, self.done = known, done
        else:  # a tensor without a leading sample axis: start from the inputs next time
            self.known, self.done = dict(self.feeds), set()


def _upstream(model: Model) -> dict[str, set[str]]:
    """Node name -> names of every node it depends on."""
    deps: dict[str, set[str]] = {}
    for node in model.nodes:  # topological order
        found: set[str] = set()
        for t in node.inputs:
            p = model.producer(t)
            if p is not None:
                found.add(p.name)
                found |= deps.get(p.name, set())
        deps[node.name] = found
    return deps


def _reconstruct(
    original: Model,
    pruned: Model,
    layer_names: list[str],
    out_keep: Mapping[str, np.ndarray],
    data: Mapping[str, np.ndarray],
    seed: int,
    refit: bool,
) -> dict[str, dict[str, Any]]:
    """Re-fits (or, with `refit` False, only measures) the layers reading pruned channels."""
    feeds = {k: np.asarray(v)[:_MAX_SAMPLES] for k, v in data.items()}
    total = len(next(iter(feeds.values())))
    notes: dict[str, dict[str, Any]] = {}
    order = {n.name: i for i, n in enumerate(pruned.nodes)}
    pending = []
    for name in sorted(layer_names, key=order.__getitem__):
        spec = _fit_spec(pruned, name, order[name], out_keep.get(name))
        if isinstance(spec, str):
            notes[name] = {"not_reconstructed": spec}
        else:
            pending.append(spec)
    deps = _upstream(pruned)
    reference, current = _Runner(original, feeds), _Runner(pruned, feeds)
    while pending:
        # A layer whose input depends on a pending re-fit waits for the next round.
        names = {f.name for f in pending}
        ready = (
            [f for f in pending if not (deps[f.name] & (names - {f.name}))] if refit else pending
        )
        pending = [f for f in pending if f not in ready]
        y_names, x_names = sorted({f.y_name for f in ready}), sorted({f.x_name for f in ready})
        reference.run(y_names, _Collector(ready, "y", total, seed))
        current.run(x_names, _Collector(ready, "x", total, seed))
        for fit in ready:
            node = pruned.node(fit.name)
            if not refit:
                fit_x = np.concatenate(fit.x).astype(np.float64)
                err = _measure(pruned, node, fit_x, np.concatenate(fit.y).astype(np.float64))
                notes[fit.name] = {"rel_error": err}
                continue
            err0, err1, kept = _solve(pruned, fit, node)
            notes[fit.name] = {
                "rel_error_before": err0,
                "rel_error": err1 if kept else err0,
                "rel_error_refit": err1,
                "reconstructed": kept,
                "rows": int(sum(len(v) for v in fit.y)),
            }
            fit.x, fit.y = [], []
    return notes


def _measure(model: Model, node: Node, x: np.ndarray, y: np.ndarray) -> float:
    """Output relative error of a layer on gathered rows, without re-fitting."""
    _, w = layer_weight(model, node)  # type: ignore[misc]
    if node.op == "Conv":
        groups = int(node.attrs.get("group", 1))
        bias = (
            model.constant_value(node.inputs[2])
            if len(node.inputs) > 2 and node.inputs[2].name
            else None
        )
        rows_g, cin_g = w.shape[0] // groups, w.shape[1]
        pred = np.concatenate(
            [
                x[:, g * cin_g : (g + 1) * cin_g].reshape(len(x), -1)
                @ w[g * rows_g : (g + 1) * rows_g].reshape(rows_g, -1).T.astype(np.float64)
                for g in range(groups)
            ],
            axis=1,
        )
        if bias is not None:
            pred = pred + bias
    elif node.op == "Gemm":
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        pred = alpha * x @ (w.T if node.attrs.get("transB", 0) else w).astype(np.float64)
        if len(node.inputs) > 2 and node.inputs[2].name:
            pred = pred + beta * model.constant_value(node.inputs[2]).reshape(-1)  # type: ignore[union-attr]
    else:
        pred = x @ w.astype(np.float64)
    den = float(np.linalg.norm(y))
    return float(np.linalg.norm(pred - y)) / den if den else 0.0
