"""Shared test helpers: build models from ONNX text, check them, compare numerics."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper, parser

from tailor.ir import Model, compare
from tailor.passes import PassContext, PassManager, check_model

__all__ = [
    "ARCHITECTURE_NAMES",
    "make_model",
    "assert_equivalent",
    "run_passes",
    "op_types",
    "assert_valid",
]

# The reference architectures of tests/architectures.py, named without importing torch so
# test modules can parametrize over them and still collect where torch is absent.
ARCHITECTURE_NAMES = (
    "resnet18",
    "resnet50",
    "resnext",
    "mobilenet_v2",
    "mobilenet_v3",
    "efficientnet_b0",
    "densenet",
    "shufflenet_v2",
    "squeezenet",
    "googlenet",
    "vgg",
    "depthwise_multiplier",
)


def make_model(text: str, weights: dict[str, np.ndarray] | None = None, *, seed: int = 0) -> Model:
    """A Model from ONNX text syntax; `weights` become initializers.

    Initializers declared in the text's `<...>` block without values get random values
    (standard normal for floats) of the declared shape, so tests read like the graph
    they check.
    """
    proto = parser.parse_model(text)
    rng = np.random.default_rng(seed)
    given = dict(weights or {})
    produced = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    # `<float[8,3,3,3] w>` without a value parses as value_info: make it a random initializer.
    declared = [
        vi for vi in proto.graph.value_info if vi.name not in produced and vi.name not in given
    ]
    inits = [init for init in proto.graph.initializer if init.name not in given]
    for vi in declared:
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value for d in tt.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(shape).astype(dtype)
        else:
            value = rng.integers(0, 3, size=shape).astype(dtype)
        inits.append(numpy_helper.from_array(value, vi.name))
    keep = [vi for vi in proto.graph.value_info if vi not in declared]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(keep)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
    for name, value in given.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(proto)
    return Model.load(proto).infer_shapes()


def op_types(model: Model) -> list[str]:
    return [n.op for n in model.nodes]


def assert_valid(model: Model) -> None:
    """The full ONNX checker passes and onnxruntime can run the model."""
    check_model(model, full=True)


def assert_equivalent(
    before: Model, after: Model, *, rtol: float = 1e-5, inputs=None, batch: int = 2
) -> float:
    """Both models give the same outputs to `rtol` relative (to the output's scale)."""
    cmp = compare(before, after, inputs, batch=batch)
    assert cmp.max_rel <= rtol, f"outputs differ: {cmp}"
    return cmp.max_rel


def run_passes(model: Model, pipeline: str, **ctx) -> Model:
    """Runs pipeline text through the PassManager with full checks; returns the model."""
    return PassManager.from_text(pipeline).run(model, PassContext(**ctx)).model
