"""Passes over the tailor IR: the `Pass` contract, the registry, pipeline text and the
PassManager, and one module per pass."""

from tailor.passes.base import REQUIRED, Param, Pass, PassContext, PassResult
from tailor.passes.manager import PassManager, PassRecord, PipelineResult, check_model
from tailor.passes.pipeline import PassCall, Pipeline, parse_pipeline
from tailor.passes.registry import available_passes, get_pass, register
from tailor.passes.selectors import Selector

__all__ = [
    "REQUIRED",
    "Param",
    "Pass",
    "PassContext",
    "PassResult",
    "PassManager",
    "PassRecord",
    "PipelineResult",
    "check_model",
    "PassCall",
    "Pipeline",
    "parse_pipeline",
    "available_passes",
    "get_pass",
    "register",
    "Selector",
]

# In-tree passes register themselves on import.
from tailor.passes import _builtin  # noqa: E402,F401
