"""Imports every in-tree pass module so each registers itself."""

from __future__ import annotations

from tailor.passes import (
    eliminate_dead,  # noqa: F401
    eliminate_noops,  # noqa: F401
    fold_batchnorm,  # noqa: F401
    fold_constants,  # noqa: F401
    fold_pad,  # noqa: F401
    fuse,  # noqa: F401
    matmul_add_to_gemm,  # noqa: F401
)
