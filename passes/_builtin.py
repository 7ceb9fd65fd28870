"""Imports every in-tree pass module so each registers itself."""

from __future__ import annotations

from tailor.passes import (
    cluster_weights,  # noqa: F401
    depthwise_separable,  # noqa: F401
    eliminate_dead,  # noqa: F401
    eliminate_noops,  # noqa: F401
    fold_batchnorm,  # noqa: F401
    fold_constants,  # noqa: F401
    fold_pad,  # noqa: F401
    fuse,  # noqa: F401
    matmul_add_to_gemm,  # noqa: F401
    prune_channels,  # noqa: F401
    prune_weights,  # noqa: F401
    quantize,  # noqa: F401
    quantize_weights,  # noqa: F401
    spatial_svd,  # noqa: F401
    svd,  # noqa: F401
    tucker2,  # noqa: F401
)
