"""The tailor IR: the model as a graph, its layers and channel dependencies, reference
execution and equivalence checks."""

from tailor.ir.equivalence import Comparison, compare
from tailor.ir.model import Constant, Model, Node, Tensor, Variable
from tailor.ir.ort import make_session, random_inputs, run_model

__all__ = [
    "Comparison",
    "compare",
    "Constant",
    "Model",
    "Node",
    "Tensor",
    "Variable",
    "make_session",
    "random_inputs",
    "run_model",
]
