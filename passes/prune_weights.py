"""Prunes individual weights by magnitude (unstructured sparsity): replaces each float
weight initializer with a bit mask of the non-zero positions and the non-zero values,
expanded back into the dense weight at run time.

Unstructured sparsity saves storage, not latency: the layer still multiplies by a dense
weight (with zeros), and no runtime tailor targets skips them. To cut latency, remove
whole channels with `prune_channels`. The smallest-magnitude weights are zeroed, either
the same fraction of every layer (`scope=layer`) or below one threshold over all
selected layers (`scope=global`, which prunes layers with small weights harder).

Encodings (docs/storage_formats.md):

- `bitmask` (default): one bit per weight (`1` = non-zero, packed 8 per byte, see
  :func:`tailor.passes._storage.pack_codes`) and the non-zero values in order, after a
  leading 0. Decoding: unpack the bits, `CumSum` numbers the non-zeros 1, 2, ...,
  multiplying by the bits sends every zero to 0, and `Gather` from the values picks
  each element. About `n / 8 + 4 * nnz` bytes for float32 (plus ~700 bytes of nodes):
  smaller than dense below ~97 % density. Needs opset >= 11 (CumSum); below it, or
  where it would not be smaller, the pruned weight is kept dense (noted).
- `dense`: the standard initializer with zeros, for runtimes that must see a plain
  weight; the file shrinks only once compressed (the change line gives zlib sizes).

ONNX's `sparse_initializer` is not used: onnx's full checker cannot infer the shapes of
layers that read one, which tailor requires of every model.
"""

from __future__ import annotations

import functools
import logging
import zlib
from dataclasses import dataclass, field

import numpy as np

from tailor.ir.model import Model
from tailor.passes._storage import (
    Decoder,
    Encoded,
    WeightSite,
    pack_codes,
    run_storage_pass,
    weight_sites,
)
from tailor.passes.base import Param, Pass, PassContext, PassResult
from tailor.passes.registry import register

__all__ = ["PruneWeights", "magnitude_masks"]

logger = logging.getLogger(__name__)

#: First opset with CumSum, which the bitmask decoder needs.
_BITMASK_OPSET = 11


def magnitude_masks(weights: list[np.ndarray], sparsity: float, scope: str) -> list[np.ndarray]:
    """Boolean keep-masks zeroing the `sparsity` fraction of smallest magnitudes.

    Args:
        weights: the weights, any shapes.
        sparsity: fraction of weights to zero (rounded down to whole weights).
        scope: `layer` (that fraction of each weight) or `global` (of all of them
            together, by one magnitude threshold).
    """
    if scope == "layer":
        return [magnitude_masks([w], sparsity, "global")[0] for w in weights]
    magnitudes = np.concatenate([np.abs(np.asarray(w, np.float64)).ravel() for w in weights])
    keep = np.ones(magnitudes.size, bool)
    count = int(np.floor(sparsity * magnitudes.size))
    if count > 0:
        keep[np.argpartition(magnitudes, count - 1)[:count]] = False
    bounds = np.cumsum([0] + [w.size for w in weights])
    return [keep[bounds[i] : bounds[i + 1]].reshape(w.shape) for i, w in enumerate(weights)]


@dataclass
class _Run:
    """Keep-masks of one run, by the weight tensor's identity."""

    masks: dict[int, np.ndarray] = field(default_factory=dict)


@register
class PruneWeights(Pass):
    """Zeros the smallest-magnitude weights and stores the rest compactly; saves storage, not latency.

    Each selected Conv, ConvTranspose, Gemm or MatMul weight loses its `sparsity`
    fraction of smallest magnitudes (per layer, or by one global threshold) and is
    stored as a bit mask plus its non-zero values, expanded to the dense weight at run
    time (`encoding=bitmask`), or as a plain initializer with zeros (`encoding=dense`).
    The layer still computes densely, so latency does not improve. A layer where no
    weight would be zeroed, or whose weight a layer outside the selector also reads, is
    left alone (noted).
    """

    name = "prune_weights"
    params = (
        Param(
            "sparsity", "float", 0.5, "fraction of weights to zero", low=0.0, high=0.999,
            search=(0.5, 0.75, 0.9),
        ),
        Param("scope", "choice", "layer", "one fraction per layer or one global threshold",
              choices=("layer", "global")),
        Param("encoding", "choice", "bitmask", "bit mask + values, or dense zeros",
              choices=("bitmask", "dense")),
    )  # fmt: skip

    def run(self, model: Model, context: PassContext) -> PassResult:
        state = _Run()
        sites, _ = weight_sites(self, model)
        masks = magnitude_masks(
            [s.value for s in sites], self.config["sparsity"], self.config["scope"]
        )
        state.masks = {id(s.tensor): m for s, m in zip(sites, masks, strict=True)}
        return run_storage_pass(self, model, context, functools.partial(self._encode, state))

    def _encode(self, state: _Run, dec: Decoder, site: WeightSite, hint: str) -> Encoded | str:
        w = site.value
        keep = state.masks[id(site.tensor)]
        if keep.all():
            return f"sparsity {self.config['sparsity']} zeros none of its {w.size:,} weights"
        pruned = np.where(keep, w, np.zeros((), w.dtype)).astype(w.dtype)
        nonzero = pruned != 0
        note = {"sparsity": float(1.0 - nonzero.mean()), "pruned": int((~keep).sum())}
        dense = functools.partial(self._dense, dec, site, hint, pruned, note)
        if self.config["encoding"] == "dense":
            return dense(None)
        planned = (w.size + 7) // 8 + (int(nonzero.sum()) + 1) * w.itemsize
        if dec.model.opset < _BITMASK_OPSET:
            return dense(f"the bit mask needs opset >= {_BITMASK_OPSET} (CumSum)")
        if planned >= w.nbytes:
            return dense(f"a bit mask would take {planned:,} bytes, not fewer than {w.nbytes:,}")
        return Encoded(
            self._bitmask(dec, pruned, nonzero, hint),
            pruned,
            f"{note['sparsity']:.1%} zeros as bit mask + values",
            {**note, "encoding": "bitmask"},
            fallback=dense,
        )

    @staticmethod
    def _dense(dec, site, hint, pruned, note, why: str | None) -> Encoded:
        """The pruned weight as a plain initializer (zeros included)."""
        w = site.value
        output = dec.replace(site.tensor, pruned, f"{hint}_pruned")
        before, after = len(zlib.compress(w.tobytes())), len(zlib.compress(pruned.tobytes()))
        note = {**note, "encoding": "dense", "zlib_bytes_before": before, "zlib_bytes_after": after}
        if why is not None:
            note["dense_because"] = why
        reason = f"; dense because {why}" if why else ""
        return Encoded(
            output,
            pruned,
            f"{note['sparsity']:.1%} zeros, dense (zlib {before:,} -> {after:,} bytes{reason})",
            note,
        )

    @staticmethod
    def _bitmask(dec: Decoder, pruned: np.ndarray, nonzero: np.ndarray, hint: str):
        bits = dec.unpack(pack_codes(nonzero, 1), 1, pruned.size, hint)
        axis = dec.const("int32_0", np.asarray(0, np.int32))
        rank = dec.op("CumSum", [bits, axis], f"{hint}_rank")
        index = dec.op("Mul", [rank, bits], f"{hint}_index")
        # Index 0 is the leading zero every pruned position reads.
        values = np.concatenate([np.zeros(1, pruned.dtype), pruned[nonzero]])
        flat = dec.op("Gather", [dec.const(f"{hint}_values", values), index], f"{hint}_dense")
        return dec.reshape(flat, pruned.shape, f"{hint}_decode")
