"""Typed errors for tailor.

Every error a user can cause (bad model file, bad pipeline text, bad parameter) derives
from :class:`TailorError`; the CLI prints its message on one line and exits with 2.
Anything else is a bug in tailor and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "TailorError",
    "ModelLoadError",
    "UnsupportedModelError",
    "DynamicShapeError",
    "PipelineSyntaxError",
    "UnknownPassError",
    "ParameterError",
    "PassError",
    "VerificationError",
    "TargetError",
    "ToolchainError",
    "RPCError",
    "DemandsError",
    "PlanError",
    "EvaluatorError",
]


class TailorError(Exception):
    """Base of all errors caused by the user's input rather than by a bug in tailor."""


class ModelLoadError(TailorError):
    """The model file could not be read: missing, corrupt, truncated or unsafe."""


class UnsupportedModelError(TailorError):
    """The model is valid ONNX but uses something tailor cannot handle (an op, a domain)."""


class DynamicShapeError(TailorError):
    """A dimension that must be static is symbolic; the message says how to fix it."""


class PipelineSyntaxError(TailorError):
    """The pipeline text does not parse; the message points at the offending column."""


class UnknownPassError(TailorError):
    """A pipeline names a pass that is not registered."""


class ParameterError(TailorError):
    """A pass parameter is missing, unknown, of the wrong type or out of range."""


class PassError(TailorError):
    """A pass could not transform the model; the message names the pass, layer and cause."""


class VerificationError(TailorError):
    """A pass broke a post-condition (invalid graph, changed outputs of a lossless pass)."""


class TargetError(TailorError):
    """A target is unknown, badly defined (YAML, fields, TVM target) or cannot run here."""


class ToolchainError(TailorError):
    """A compiler a target needs (a cross compiler, an NDK) is not installed."""


class RPCError(TailorError):
    """A TVM RPC tracker or device cannot be reached: bad address, no server, unknown key."""


class DemandsError(TailorError):
    """A budget, weight or demands file the scheduler cannot read."""


class PlanError(TailorError):
    """A plan file that is malformed, or does not fit the model it is applied to."""


class EvaluatorError(TailorError):
    """An evaluator (labels file, `module:function`) that cannot be built or that failed."""
