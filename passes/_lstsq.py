"""Least-squares re-fitting of a layer on calibration activations: replaces "prune and
retrain" with a closed-form solve (the AIMET / He et al. 2017 reconstruction step).

Data-driven passes (channel-pruning reconstruction, data-aware factorizations, bias
correction) share three pieces: the rows of a convolution's im2col matrix at sampled
output positions, a ridge-regularised solve that stays close to the current weights
when the data are few, and the relative output error before and after.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import scipy.linalg

__all__ = ["conv_geometry", "conv_patches", "refit_linear", "rel_error", "sample_positions"]

logger = logging.getLogger(__name__)


def conv_geometry(
    attrs: dict, in_spatial: Sequence[int], kernel: Sequence[int]
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Strides, dilations, begin pads, end pads and output size of an ONNX Conv.

    Args:
        attrs: the Conv node's attributes (`strides`, `dilations`, `pads`, `auto_pad`).
        in_spatial: the input's spatial dimensions.
        kernel: the kernel's spatial dimensions.
    """
    d = len(in_spatial)
    strides = [int(s) for s in attrs.get("strides", [1] * d)]
    dilations = [int(s) for s in attrs.get("dilations", [1] * d)]
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, dil in zip(in_spatial, kernel, strides, dilations, strict=True):
            out = math.ceil(size / s)
            total = max((out - 1) * s + (k - 1) * dil + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
    elif auto_pad == "VALID":
        begin, end = [0] * d, [0] * d
    else:
        pads = [int(p) for p in attrs.get("pads", [0] * (2 * d))]
        begin, end = pads[:d], pads[d:]
    out_spatial = [
        (size + b + e - dil * (k - 1) - 1) // s + 1
        for size, b, e, k, s, dil in zip(
            in_spatial, begin, end, kernel, strides, dilations, strict=True
        )
    ]
    return strides, dilations, begin, end, out_spatial


def conv_patches(
    x: np.ndarray,
    positions: np.ndarray,
    *,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads_begin: Sequence[int],
    pads_end: Sequence[int],
    out_spatial: Sequence[int],
) -> np.ndarray:
    """Rows of the im2col matrix of `x` at the given output positions.

    Args:
        x: the Conv input, `[N, C, *spatial]`.
        positions: flat indices into `(N, *out_spatial)`.

    Returns:
        `[R, C, *kernel]`: row r holds the input window that output position r reads, so
        `patches.reshape(R, -1) @ W.reshape(Cout, -1).T` is the Conv's output there
        (for one group).
    """
    d = x.ndim - 2
    width = [(0, 0), (0, 0)] + [(int(b), int(e)) for b, e in zip(pads_begin, pads_end, strict=True)]
    padded = np.pad(x, width) if any(sum(w) for w in width) else x
    coords = np.unravel_index(positions, (x.shape[0], *out_spatial))
    rows = len(positions)
    index: list[np.ndarray] = [coords[0].reshape([rows] + [1] * d)]
    for i in range(d):
        base = coords[i + 1] * int(strides[i])
        offsets = np.arange(int(kernel[i])) * int(dilations[i])
        shape = [rows] + [1] * d
        shape[1 + i] = int(kernel[i])
        index.append((base[:, None] + offsets[None, :]).reshape(shape))
    channels_last = np.moveaxis(padded, 1, -1)
    return np.moveaxis(channels_last[tuple(index)], -1, 1)


def sample_positions(total: int, count: int, seed: Sequence[int]) -> np.ndarray:
    """`count` distinct sorted indices below `total` (all of them when `count >= total`)."""
    if count >= total:
        return np.arange(total)
    rng = np.random.default_rng(list(seed))
    return np.sort(rng.choice(total, size=count, replace=False))


def refit_linear(
    x: np.ndarray,
    y: np.ndarray,
    w0: np.ndarray,
    b0: np.ndarray | None = None,
    *,
    ridge: float = 1e-3,
    fit_intercept: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Least-squares weights for `x @ w + b ≈ y`, regularised towards `w0`.

    Minimises `||x w + b - y||² + λ ||w - w0||²` with `λ = ridge * trace(xᵀx) / d` (on
    centred data when fitting the intercept). Pulling towards the current weights
    instead of towards zero means that with few rows the result stays near the layer
    it replaces rather than collapsing.

    Args:
        x: `[R, d]` inputs.
        y: `[R, k]` targets.
        w0: `[d, k]` current weights.
        b0: `[k]` current bias (ignored by the solve; returned when no intercept is fitted).
        ridge: regularisation relative to the mean input energy.
        fit_intercept: fit a bias (unregularised) as well.

    Returns:
        `(w, b)` in float64; `b` is None when there is no intercept and no `b0`.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w0 = np.asarray(w0, np.float64)
    if fit_intercept:
        x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
        xc, yc = x - x_mean, y - y_mean
    else:
        xc = x
        yc = y if b0 is None else y - np.asarray(b0, np.float64)
    gram = xc.T @ xc
    d = gram.shape[0]
    lam = ridge * float(np.trace(gram)) / max(d, 1)
    if lam <= 0.0:
        lam = ridge
    rhs = xc.T @ (yc - xc @ w0)
    gram[np.diag_indices(d)] += lam
    try:
        delta = scipy.linalg.solve(gram, rhs, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        delta = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    w = w0 + delta
    if fit_intercept:
        return w, y_mean - x_mean @ w
    return w, None if b0 is None else np.asarray(b0, np.float64)


def rel_error(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> float:
    """`||x w + b - y|| / ||y||` (Frobenius); 0 when both are zero."""
    pred = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    if b is not None:
        pred = pred + np.asarray(b, np.float64)
    num = float(np.linalg.norm(pred - y))
    den = float(np.linalg.norm(y))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den
