"""tailor: tailors a trained ONNX model to a device and the way it is used.

The public API is imported lazily so that `import tailor.ir` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "run_pipeline", "inspect_model", "__version__"]


def __getattr__(name: str):
    if name in ("load", "run_pipeline", "inspect_model"):
        from tailor import api

        return getattr(api, name)
    raise AttributeError(f"module 'tailor' has no attribute {name!r}")
