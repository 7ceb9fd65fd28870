"""The feature vector of a kernel (see :mod:`.latency_kernels`) that the learned latency
model regresses on: op and kind, data type, work (MACs, elements, bytes), the geometry
that decides which onnxruntime code path runs (channel counts and whether they are
multiples of 8 for the NCHWc kernels, kernel size, stride, groups, the im2col GEMM
shape), what is fused in, whether a QDQ layer can become an integer kernel, and, once
annotated, what onnxruntime's optimizer actually made of it (an NCHWc conv, a
QLinearConv with layout transposes, a float conv with run-time dequantization, ...).

Trees need no scaling, so features are raw counts; ratios a tree cannot form from two
splits (arithmetic intensity) are given explicitly.
"""

from __future__ import annotations

import math

from tailor.cost_models.latency_kernels import ACTIVATIONS, KINDS, Kernel

__all__ = ["FEATURE_NAMES", "features"]

#: Op types with a feature of their own (others share `op_other`).
_OPS = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "QLinearConv",
    "ConvInteger",
    "MatMulInteger",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Concat",
    "Split",
    "Slice",
    "Transpose",
    "Reshape",
    "Flatten",
    "Add",
    "Mul",
    "Sigmoid",
    "HardSwish",
    "HardSigmoid",
    "Relu",
    "Clip",
    "BatchNormalization",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "Softmax",
    "Gather",
    "Shape",
)


def _mod(value: int, m: int) -> float:
    return float(value > 0 and value % m == 0)


def _pad(value: int, m: int) -> float:
    """How much work padding `value` channels up to a block of `m` adds (1: none; 0: no
    channels). NCHWc kernels compute whole blocks of 8 channels on AVX2."""
    return 0.0 if value <= 0 else math.ceil(value / m) * m / value


#: What onnxruntime's optimizer made of a kernel (`Kernel.runtime_ops`), counted by group.
_RUNTIME = (
    "nchwc",
    "reorder_in",
    "reorder_out",
    "transpose",
    "qlinear",
    "integer",
    "dequantize",
    "quantize",
    "float_conv",
    "gemm",
)


def _runtime_group(op: str) -> str | None:
    if op == "ReorderInput@nchwc":
        return "reorder_in"
    if op == "ReorderOutput@nchwc":
        return "reorder_out"
    if op.endswith("@nchwc"):
        return "nchwc"
    if op.startswith(("QLinear", "QGemm", "Nhwc", "DynamicQuantizeMatMul")):
        return "qlinear"
    if op in ("ConvInteger", "MatMulInteger", "MatMulIntegerToFloat"):
        return "integer"
    if op == "DequantizeLinear":
        return "dequantize"
    if op in ("QuantizeLinear", "DynamicQuantizeLinear"):
        return "quantize"
    if op in ("Conv", "FusedConv", "ConvTranspose"):
        return "float_conv"
    if op in ("Gemm", "FusedGemm", "MatMul", "FusedMatMul"):
        return "gemm"
    if op == "Transpose":
        return "transpose"
    return None


#: The names of :func:`features`, in order.
FEATURE_NAMES: tuple[str, ...] = (
    *(f"kind_{k}" for k in KINDS),
    *(f"op_{o}" for o in _OPS),
    "op_other",
    "int8",
    "macs",
    "in_elems",
    "out_elems",
    "weight_bytes",
    "activation_bytes",
    "intensity",
    "cin",
    "cout",
    "cin_mod8",
    "cout_mod8",
    "cin_mod4",
    "cout_mod4",
    "cin_mod16",
    "cout_mod16",
    "cin_pad8",
    "cout_pad8",
    "cin_per_group",
    "cout_per_group",
    "grouped",
    "kh",
    "kw",
    "stride",
    "dilation",
    "groups",
    "depthwise",
    "spatial_rank",
    "out_h",
    "out_w",
    "in_h",
    "in_w",
    "out_pixels",
    "group_pixels",
    "gemm_m",
    "gemm_k",
    "gemm_n",
    "inputs",
    "nodes",
    "fused_bn",
    "fused_act",
    "fused_residual",
    "fused_quantize",
    "fused_dequantize",
    "qdq_fanout",
    "activation_uint8",
    *(f"rt_{name}" for name in _RUNTIME),
    "rt_nodes",
    "rt_other",
)


def features(k: Kernel) -> list[float]:
    """The kernel's feature vector, in :data:`FEATURE_NAMES` order."""
    x = [s for s in k.input_shapes if s]
    y = [s for s in k.output_shapes if s]
    in_elems = float(sum(math.prod(s) for s in x))
    out_elems = float(sum(math.prod(s) for s in y))
    ks = list(k.kernel_size) or [0]
    spatial_in = x[0][2:] if x and len(x[0]) > 2 else []
    spatial_out = y[0][2:] if y and len(y[0]) > 2 else []

    def hw(s: list[int]) -> tuple[float, float]:
        if not s:
            return 0.0, 0.0
        return (float(s[-2]), float(s[-1])) if len(s) >= 2 else (1.0, float(s[-1]))

    in_h, in_w = hw(spatial_in)
    out_h, out_w = hw(spatial_out)
    fused = k.fused
    values: dict[str, float] = {f"kind_{kind}": float(k.kind == kind) for kind in KINDS}
    values.update({f"op_{o}": float(k.op == o) for o in _OPS})
    values["op_other"] = float(k.op not in _OPS)
    values.update(
        {
            "int8": float(k.dtype == "int8"),
            "macs": float(k.macs),
            "in_elems": in_elems,
            "out_elems": out_elems,
            "weight_bytes": float(k.weight_bytes),
            "activation_bytes": float(k.activation_bytes),
            "intensity": k.macs / max(1.0, k.weight_bytes + k.activation_bytes),
            "cin": float(k.cin),
            "cout": float(k.cout),
            "cin_mod8": _mod(k.cin, 8),
            "cout_mod8": _mod(k.cout, 8),
            "cin_mod4": _mod(k.cin, 4),
            "cout_mod4": _mod(k.cout, 4),
            "cin_mod16": _mod(k.cin, 16),
            "cout_mod16": _mod(k.cout, 16),
            "cin_pad8": _pad(k.cin, 8),
            "cout_pad8": _pad(k.cout, 8),
            "cin_per_group": k.cin / max(1, k.groups),
            "cout_per_group": k.cout / max(1, k.groups),
            # grouped but not depthwise: onnxruntime's integer kernels loop over groups
            "grouped": float(k.groups > 1 and not (k.cin == k.groups == k.cout)),
            "kh": float(ks[-2] if len(ks) >= 2 else (1 if k.kernel_size else 0)),
            "kw": float(ks[-1]),
            "stride": float(max(k.strides, default=0)),
            "dilation": float(max(k.dilations, default=0)),
            "groups": float(k.groups),
            "depthwise": float(k.groups > 1 and k.groups == k.cin),
            "spatial_rank": float(len(k.kernel_size) or len(spatial_out)),
            "out_h": out_h,
            "out_w": out_w,
            "in_h": in_h,
            "in_w": in_w,
            "out_pixels": out_h * out_w,
            # a per-group, per-pixel cost (grouped QLinearConv runs group by group) is
            # a product trees cannot form from two splits
            "group_pixels": max(1, k.groups) * out_h * out_w,
            "gemm_m": float(k.gemm[0]),
            "gemm_k": float(k.gemm[1]),
            "gemm_n": float(k.gemm[2]),
            "inputs": float(len(x)),
            "nodes": float(len(k.nodes)),
            "fused_bn": float("BatchNormalization" in fused),
            "fused_act": float(any(f in ACTIVATIONS for f in fused)),
            "fused_residual": float("Add:residual" in fused),
            "fused_quantize": float("QuantizeLinear" in fused),
            "fused_dequantize": float(sum(f == "DequantizeLinear" for f in fused)),
            "qdq_fanout": float(k.qdq_fanout),
            "activation_uint8": float(k.activation_dtype == "uint8"),
        }
    )
    counts = dict.fromkeys(_RUNTIME, 0.0)
    other = 0.0
    for op in k.runtime_ops:
        group = _runtime_group(op)
        if group is None:
            other += 1
        else:
            counts[group] += 1
    values.update({f"rt_{name}": v for name, v in counts.items()})
    values["rt_nodes"] = float(len(k.runtime_ops))
    values["rt_other"] = other
    return [values[name] for name in FEATURE_NAMES]
