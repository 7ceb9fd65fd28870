"""Shares weight values through a k-means codebook ("deep compression", Han et al. 2016):
replaces each float weight initializer with one small index per weight and a float
codebook, gathered back into the weight at run time.

Clustering saves storage, not latency: the decoded weight is an ordinary float tensor.
The codebook is fitted by one-dimensional k-means (Lloyd's iterations, assignments by
binary search on the midpoints between sorted centroids) from a linear initialisation
spread evenly over the weights' range, which Han et al. found keeps the rare large
weights better than random or density-based starts; it is deterministic (the seed only
picks the subsample of very large layers). When a weight has no more distinct values
than `clusters`, the codebook is those values and the rewrite is exact.

Encoding (docs/storage_formats.md): indices as uint8 in the weight's shape, or 4-bit
indices packed two per byte when `clusters <= 16` (unpacked with integer Div and Mod);
Cast to int32, Gather from the codebook.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import numpy as np

from tailor.ir.model import Constant, Model
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

__all__ = ["ClusterWeights", "kmeans_1d"]

logger = logging.getLogger(__name__)

#: Weights used to fit one codebook; larger layers are subsampled (assignment uses all).
_FIT_SAMPLES = 1 << 20
_MAX_ITERATIONS = 100


def kmeans_1d(values: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Sorted centroids of at most `k` clusters of `values` (the distinct values if few).

    Args:
        values: any shape; flattened.
        k: the number of clusters.
        seed: picks the subsample when there are more than 2^20 values.
    """
    flat = np.asarray(values).ravel()
    distinct = np.unique(flat)
    if distinct.size <= k:
        return distinct
    fit = flat.astype(np.float64)
    if fit.size > _FIT_SAMPLES:
        fit = np.random.default_rng(seed).choice(fit, _FIT_SAMPLES, replace=False)
    centroids = np.linspace(fit.min(), fit.max(), k)
    tolerance = 1e-9 * max(float(np.abs(fit).max()), 1e-30)
    for _ in range(_MAX_ITERATIONS):
        labels = assign(fit, centroids)
        counts = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=fit, minlength=k)
        # An empty cluster keeps its centroid: its code is simply unused.
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        done = np.max(np.abs(updated - centroids)) <= tolerance
        centroids = np.sort(updated)
        if done:
            break
    return centroids


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted `centroids` for every value (flattened)."""
    edges = (centroids[1:] + centroids[:-1]) / 2.0
    return np.searchsorted(edges, np.asarray(values, np.float64).ravel()).astype(np.int64)


@register
class ClusterWeights(Pass):
    """Replaces layer weights by a k-means codebook and per-weight indices; saves storage, not latency.

    Each selected Conv, ConvTranspose, Gemm or MatMul weight is clustered into
    `clusters` values (one codebook per layer, or one shared by all selected layers when
    `per_layer` is false); it is stored as 4-bit (clusters <= 16) or 8-bit indices and
    decoded by a Gather at run time, so the layer computes in float as before. Exact
    when a weight has no more distinct values than `clusters`. A weight whose encoding
    would not be smaller, or that a layer outside the selector also reads, is left alone.
    """

    name = "cluster_weights"
    params = (
        Param(
            "clusters", "int", 16, "codebook size (<= 16: 4-bit indices)", low=2, high=256,
            search=(4, 16, 32, 256),
        ),
        Param("per_layer", "bool", True, "one codebook per layer (else one for all layers)"),
    )  # fmt: skip

    def run(self, model: Model, context: PassContext) -> PassResult:
        state = _Run(seed=context.seed)
        if not self.config["per_layer"]:
            sites, _ = weight_sites(self, model)
            if sites:
                pooled = np.concatenate([s.value.ravel().astype(np.float64) for s in sites])
                state.shared = kmeans_1d(pooled, self.config["clusters"], seed=context.seed)
        return run_storage_pass(self, model, context, functools.partial(self._encode, state))

    def _encode(self, state: _Run, dec: Decoder, site: WeightSite, hint: str) -> Encoded | str:
        w = site.value
        k = self.config["clusters"]
        shared = state.shared is not None
        centroids = state.shared if shared else kmeans_1d(w, k, seed=state.seed)
        codebook = np.asarray(centroids).astype(w.dtype)
        index = assign(w, codebook.astype(np.float64))
        packed = k <= 16
        index_bytes = (w.size + 1) // 2 if packed else w.size
        # A shared codebook is stored once: only the first layer pays for it.
        book_bytes = 0 if codebook.dtype.str in state.books else codebook.nbytes
        if index_bytes + book_bytes >= w.nbytes:
            return (
                f"{k} clusters would take {index_bytes + book_bytes:,} bytes, "
                f"not fewer than {w.nbytes:,}"
            )
        if packed:
            ints = dec.unpack(pack_codes(index, 4), 4, w.size, hint)
            ints = dec.reshape(ints, w.shape, f"{hint}_s")
        else:
            stored = index.astype(np.uint8).reshape(w.shape)
            ints = dec.cast(dec.const(f"{hint}_index", stored), np.int32, f"{hint}_index")
        if shared:
            key = codebook.dtype.str
            if key not in state.books:
                state.books[key] = dec.const("shared_codebook", codebook)
            book = state.books[key]
        else:
            book = dec.const(f"{hint}_codebook", codebook)
        output = dec.op("Gather", [book, ints], f"{hint}_decode", {"axis": 0})
        scope = "shared" if shared else "layer"
        return Encoded(
            output,
            codebook[index].reshape(w.shape),
            f"{codebook.size} clusters ({scope} codebook), {4 if packed else 8}-bit indices",
            {"clusters": int(codebook.size), "index_bits": 4 if packed else 8, "codebook": scope},
        )


@dataclass
class _Run:
    """State of one run: the shared codebook (if any) and its constants by dtype."""

    seed: int = 0
    shared: np.ndarray | None = None
    books: dict[str, Constant] = field(default_factory=dict)
