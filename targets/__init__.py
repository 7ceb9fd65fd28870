"""Device targets: TVM targets, compilers, power and roofline profiles (see DESIGN.md).

- :mod:`tailor.targets.target`: the frozen :class:`Target`, the registry, YAML user targets.
- :mod:`tailor.targets.builtin`: the shipped targets and `host` detection.
- :mod:`tailor.targets.tvm_build`: ONNX -> TVM module for a target, export, local runs.
- :mod:`tailor.targets.rpc`: devices behind a TVM RPC tracker.
- :mod:`tailor.targets.tune`: MetaSchedule tuning with a resumable database.

Importing this package does not import TVM; the submodules that need it import it lazily.
"""

from tailor.targets.target import (
    DTYPES,
    TVM_KINDS,
    Target,
    available_targets,
    get_target,
    load_targets,
    parse_targets,
    register_target,
)

__all__ = [
    "DTYPES",
    "TVM_KINDS",
    "Target",
    "available_targets",
    "get_target",
    "load_targets",
    "parse_targets",
    "register_target",
]
