"""The maths of the low-rank passes: rank resolution (a fraction or integer, an energy
threshold, or empirical Variational Bayes), the truncated SVD, and the data-aware
(whitened) SVD of SVD-LLM, which minimises `||X W - X A B||` through the Cholesky factor
of `XᵀX` instead of `||W - A B||`.

Pure numpy/scipy on arrays: nothing here knows about graphs.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import scipy.linalg
import scipy.optimize

__all__ = [
    "WHITEN_RIDGE",
    "energy_rank",
    "evbmf_rank",
    "resolve_rank",
    "truncated_svd",
    "weight_rel_error",
    "whitened_factors",
]

logger = logging.getLogger(__name__)

#: Ridge added to `XᵀX` before the Cholesky factorization, relative to its mean diagonal:
#: directions the calibration data never excite still get a small weight.
WHITEN_RIDGE = 1e-3


def resolve_rank(rank: float | int, full: int) -> int:
    """A `rank` parameter as a rank: an integer is capped at `full`; a fraction in (0, 1]
    is rounded up (so `1.0` is the full, exact rank), at least 1."""
    if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
        return max(1, min(int(rank), full))
    return max(1, min(full, math.ceil(round(float(rank) * full, 9))))


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """The smallest rank whose singular values hold `energy` of the total squared ones."""
    s2 = np.asarray(singular_values, np.float64) ** 2
    total = float(s2.sum())
    if total <= 0.0:
        return 1
    kept = np.cumsum(s2) / total
    return int(min(len(s2), np.searchsorted(kept, energy - 1e-12) + 1))


def evbmf_rank(matrix: np.ndarray) -> int:
    """Rank kept by empirical Variational Bayes matrix factorization (EVBMF).

    The global analytic solution of Nakajima, Sugiyama, Babacan and Tomioka (JMLR 2013):
    the noise variance is estimated by minimising the closed-form free energy over its
    analytic bounds, and singular values above the EVB threshold
    `sqrt(M σ² (1 + τ̄)(1 + α/τ̄))` (`α = L/M`, `τ̄ = 2.5129 √α`) are kept. Kim et al. 2016
    use it on the mode-0 and mode-1 unfoldings of a Conv weight to pick Tucker-2 ranks.

    Returns:
        The estimated rank (0 when the matrix looks like pure noise).
    """
    y = np.asarray(matrix, np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    if rows == 0 or float(s[0]) <= 0.0:
        return 0
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    s2 = s**2
    # Analytic bounds of the noise variance (Nakajima et al. 2013, Theorem 8).
    eh_ub = int(min(math.ceil(rows / (1.0 + alpha)) - 1, rows)) - 1
    upper = float(s2.sum()) / (rows * cols)
    lower = max(float(s2[eh_ub + 1]) / (cols * x_bar), float(np.mean(s2[eh_ub + 1 :])) / cols)

    def free_energy(sigma2: float) -> float:
        # Terms constant in σ² (the -log s_h² of every component) are dropped, so that
        # zero singular values (rank-deficient weights) stay finite.
        x = s2 / (cols * sigma2)
        big = x[x > x_bar]
        tau = 0.5 * (big - (1 + alpha) + np.sqrt((big - (1 + alpha)) ** 2 - 4 * alpha))
        return float(
            x.sum()
            + len(s) * math.log(cols * sigma2)
            + np.sum(np.log(tau + 1) - tau + alpha * np.log(tau / alpha + 1))
        )

    if not upper > lower > 0.0:
        sigma2 = upper
    else:
        sigma2 = float(
            scipy.optimize.minimize_scalar(free_energy, bounds=(lower, upper), method="bounded").x
        )
    threshold = math.sqrt(cols * sigma2 * x_bar)
    return int(np.sum(s > threshold))


# ---------------------------------------------------------------------- factorizations
def truncated_svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`U, s, Vᵀ` of a matrix in float64 (thin)."""
    return np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)


def weight_rel_error(weight: np.ndarray, approx: np.ndarray) -> float:
    """`||W - W'|| / ||W||` (Frobenius); 0 for a zero weight reproduced exactly."""
    w = np.asarray(weight, np.float64)
    den = float(np.linalg.norm(w))
    num = float(np.linalg.norm(w - np.asarray(approx, np.float64)))
    return num / den if den else (0.0 if num == 0.0 else float("inf"))


def whitened_factors(
    weight: np.ndarray, gram: np.ndarray, *, ridge: float = WHITEN_RIDGE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The data-aware SVD of SVD-LLM: factors of `W` (in x out) ordered by what they
    contribute to `X W` on the data whose `XᵀX` is `gram`.

    With `XᵀX + λI = L Lᵀ`, `||X (W - W')||` equals `||Lᵀ (W - W')||` (up to the ridge),
    so the truncated SVD `Lᵀ W = U Σ Vᵀ` gives the best rank-r fit in output space:
    `A = L⁻ᵀ U_r Σ_r^½`, `B = Σ_r^½ V_rᵀ`. At full rank `A B = W` exactly.

    Returns:
        `(a, s, b)`: `a` in x k, the singular values of `Lᵀ W` and `b` k x out (k = min
        dims); the caller keeps the first r columns of `a` and rows of `b`.
    """
    g = np.asarray(gram, np.float64)
    d = g.shape[0]
    lam = ridge * float(np.trace(g)) / max(d, 1)
    if lam <= 0.0:
        lam = ridge
    chol = scipy.linalg.cholesky(g + lam * np.eye(d), lower=True)
    u, s, vt = truncated_svd(chol.T @ np.asarray(weight, np.float64))
    root = np.sqrt(s)
    a = scipy.linalg.solve_triangular(chol.T, u * root, lower=False)
    return a, s, root[:, None] * vt
