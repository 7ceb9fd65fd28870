"""Quantizes layers to 8-bit integers with onnxruntime.quantization: replaces float Conv,
Gemm and MatMul arithmetic by QuantizeLinear/DequantizeLinear pairs around them (static,
activations calibrated on data) or by integer ops that quantize activations at run time
(dynamic).

`mode=int8` runs `quantize_static` in QDQ format: per-channel (or per-tensor) int8
weights, activation ranges from the calibration data (MinMax, Entropy or Percentile), a
standard-domain graph that onnxruntime fuses into QLinearConv/QLinearMatMul and that
other runtimes read as ONNX. `mode=dynamic` runs `quantize_dynamic` on Conv, Gemm and
MatMul only (its LSTM and Attention kernels live in the com.microsoft domain, which
tailor does not load): weights stored as int8, activations quantized per batch by
DynamicQuantizeLinear into ConvInteger/MatMulInteger; no calibration data needed.

Steps:

1. The opset is raised where the format needs it: per-channel QDQ needs DequantizeLinear's
   `axis` (opset 13), 16-bit activations need opset 21, dynamic quantization opset 11.
2. onnxruntime's pre-processing (`quant_pre_process`): symbolic and ONNX shape inference,
   so every activation has the shape the quantizer needs. Its graph optimisation is
   skipped: it would rename and fuse nodes, and the selector names nodes; fusing is the
   job of tailor's `fuse` pass, run before this one.
3. `nodes_to_quantize` is every node the `layers` selector picks, so a layer left out
   stays in float (its weight, too). All of it happens in a temporary folder that is
   removed afterwards.
4. The result is loaded back (checker, operator domains) and each selected layer's
   output error is measured on calibration data (weight-space error without data).
5. Bias correction (`int8` with data): weight rounding shifts each output channel's
   mean (`ΔW · E[x]`, Nagel et al. 2019). The shared empirical correction of
   :mod:`tailor.passes._bias` measures each quantized Conv/Gemm's mean output error
   against the float model on the first 64 calibration samples, layer after layer in
   dependency order, and folds it into the layer's int32 bias (a bias is added where
   there was none). Measured by `python -m benchmarks.bias_correction`
   (benchmarks/results/bias_correction.json): it lowered the logits' error on held-out
   inputs in all 6 settings of the three trained benchmark models (by 1 to 36 %, top-1
   within 0.1 point) and in all 24 settings of the 12 reference architectures (random
   weights, 32 calibration samples; by 3 to 41 %), where the analytic `ΔW · E[x]`
   correction it replaces made 2 of the 6 trained settings worse. It costs one
   onnxruntime run per level of dependent layers; it is on by default.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tailor.errors import ParameterError, PassError, TailorError
from tailor.ir.activations import capture, iter_batches
from tailor.ir.layers import layer_weight
from tailor.ir.model import Model, Node, _first_line, over_protobuf_limit
from tailor.passes._bias import correct_bias
from tailor.passes._storage import ERROR_SAMPLES, capture_outputs, rel_error, skip
from tailor.passes.base import Param, Pass, PassContext, PassResult
from tailor.passes.registry import register
from tailor.passes.rewrite import refresh_shapes

__all__ = ["Quantize"]

logger = logging.getLogger(__name__)

_DYNAMIC_OPS = ["Conv", "MatMul", "Gemm"]
_TYPES = ("int8", "uint8", "int16", "uint16")
_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: Samples per onnxruntime call while calibrating.
_BATCH = 16


@register
class Quantize(Pass):
    """Quantizes layers to int8 with onnxruntime.quantization: static QDQ with calibrated activations, or dynamic.

    `mode=int8` needs calibration data (`--data FILE.npz`) and produces a QDQ graph:
    int8 weights (per output channel with `per_channel`), activation ranges from the
    `calibration` method, and, with `bias_correction`, biases corrected for the mean
    shift that weight rounding causes. `mode=dynamic` stores Conv/Gemm/MatMul weights as
    int8 and quantizes activations at run time. Only the nodes the `layers` selector
    picks are quantized; the rest stay float. Run `fuse` first: the pass does not fuse.
    """

    name = "quantize"
    params = (
        Param("mode", "choice", "int8", "int8 (static QDQ, calibrated) or dynamic",
              choices=("int8", "dynamic"), search=("int8", "dynamic")),
        Param("per_channel", "bool", True, "one weight scale per output channel"),
        Param("calibration", "choice", "minmax", "how activation ranges are calibrated",
              choices=tuple(_CALIBRATION), search=tuple(_CALIBRATION)),
        Param("activation_type", "choice", "int8", "activation type (static mode)",
              choices=_TYPES),
        Param("weight_type", "choice", "int8", "weight type (dynamic: int8 or uint8)",
              choices=_TYPES),
        Param("reduce_range", "bool", False, "7-bit weights, for CPUs without VNNI that overflow"),
        Param("percentile", "float", 99.999, "percentile for calibration=percentile",
              low=90.0, high=100.0),
        Param("samples", "int", 256, "calibration samples used (the first ones)", low=1),
        Param("bias_correction", "bool", True, "correct biases for the weight rounding shift"),
    )  # fmt: skip

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self.config["mode"] == "dynamic" and self.config["weight_type"] not in ("int8", "uint8"):
            raise ParameterError(
                f"pass {self.name}: dynamic quantization stores weights as int8 or uint8, "
                f"not {self.config['weight_type']}"
            )

    # ------------------------------------------------------------------ run
    def run(self, model: Model, context: PassContext) -> PassResult:
        static = self.config["mode"] == "int8"
        if static:
            context.require_calibration(f"{self.name}(mode=int8)")
        data = _feeds(model, context.calibration, self.config["samples"], self.name)
        notes: dict[str, dict[str, Any]] = defaultdict(dict)
        selected = [n for n in model.nodes if self.selects(model, n)]
        layers = [n for n in selected if layer_weight(model, n) is not None]
        if not layers:
            return PassResult(model, False, [], dict(notes))
        outputs = {n.name: n.outputs[0].name for n in layers}
        reference = capture_outputs(model, data, outputs) if data else None
        weights = {n.name: layer_weight(model, n) for n in layers}
        changes: list[str] = []
        proto = self._prepare(model, changes)
        names = [n.name for n in selected if not _clips_graph_output(model, n)]
        if not static:
            # quantize_dynamic first rewrites a Gemm into a MatMul named after it.
            names += [f"{n.name}_MatMul" for n in layers if n.op == "Gemm"]
        quantized = self._quantize(proto, names, data, static)
        refresh_shapes(quantized)

        done = []
        for n in layers:
            if _is_quantized(quantized, n, weights[n.name][0], static):
                done.append(n)
            else:
                skip(notes, n.name, f"onnxruntime.quantization left this {n.op} in float")
        if not done:
            return PassResult(model, False, [], dict(notes))
        corrected: dict[str, float] = {}
        if static and data and self.config["bias_correction"]:
            corrected = _correct_biases(model, quantized, done, outputs, data, notes)
        self._report(quantized, done, weights, outputs, reference, data, corrected, notes, changes)
        return PassResult(quantized, True, changes, dict(notes))

    def _prepare(self, model: Model, changes: list[str]) -> onnx.ModelProto:
        """The model as a proto at the opset the chosen format needs."""
        proto = model.to_proto()
        c = self.config
        need = 11
        if c["mode"] == "int8" and c["per_channel"]:
            need = 13
        if c["mode"] == "int8" and "16" in c["activation_type"] + c["weight_type"]:
            need = 21
        if model.opset < need:
            try:
                proto = onnx.version_converter.convert_version(proto, need)
            except Exception as e:  # the converter raises bare RuntimeErrors
                raise PassError(
                    f"pass {self.name}: cannot raise the model's opset {model.opset} to {need}, "
                    f"which this quantization format needs: {_first_line(e)}"
                ) from e
            changes.append(f"raised the opset from {model.opset} to {need} for quantization")
        return proto

    def _quantize(
        self,
        proto: onnx.ModelProto,
        nodes: list[str],
        data: Mapping[str, np.ndarray] | None,
        static: bool,
    ) -> Model:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_dynamic,
            quantize_static,
        )

        c = self.config
        qtype = {
            "int8": QuantType.QInt8,
            "uint8": QuantType.QUInt8,
            "int16": QuantType.QInt16,
            "uint16": QuantType.QUInt16,
        }
        with tempfile.TemporaryDirectory(prefix="tailor-quantize-") as tmp:
            src, pre, out = (str(Path(tmp) / f) for f in ("in.onnx", "pre.onnx", "out.onnx"))
            # Above 2 GiB a model must carry its weights in a separate file.
            large = over_protobuf_limit(proto, 1 << 30)
            onnx.save_model(proto, src, save_as_external_data=large, location="in.data")
            # onnxruntime's calibrators print progress to stdout.
            with contextlib.redirect_stdout(io.StringIO()):
                _pre_process(quant_pre_process, src, pre, large)
                try:
                    if static:
                        method = getattr(CalibrationMethod, _CALIBRATION[c["calibration"]])
                        cache = str(Path(tmp) / "ranges.json")
                        _calibrate(pre, cache, data or {}, method, c["percentile"], large)
                        quantize_static(
                            pre,
                            out,
                            None,
                            quant_format=QuantFormat.QDQ,
                            per_channel=c["per_channel"],
                            reduce_range=c["reduce_range"],
                            activation_type=qtype[c["activation_type"]],
                            weight_type=qtype[c["weight_type"]],
                            nodes_to_quantize=nodes,
                            calibrate_method=method,
                            use_external_data_format=large,
                            calibration_cache_path=cache,
                        )
                    else:
                        quantize_dynamic(
                            pre,
                            out,
                            op_types_to_quantize=_DYNAMIC_OPS,
                            per_channel=c["per_channel"],
                            reduce_range=c["reduce_range"],
                            weight_type=qtype[c["weight_type"]],
                            nodes_to_quantize=nodes,
                            use_external_data_format=large,
                        )
                except TailorError:
                    raise
                except Exception as e:
                    raise PassError(
                        f"pass {self.name}: onnxruntime.quantization failed: {_first_line(e)}"
                    ) from e
            result = onnx.load(out)
        _restore_metadata(result, proto)
        try:
            return Model.load(result)
        except TailorError as e:
            raise PassError(
                f"pass {self.name}: onnxruntime.quantization produced a model tailor cannot load: {e}"
            ) from e

    def _report(
        self,
        quantized: Model,
        done: list[Node],
        weights: dict[str, tuple[int, np.ndarray]],
        outputs: dict[str, str],
        reference: dict[str, np.ndarray] | None,
        data: Mapping[str, np.ndarray] | None,
        corrected: dict[str, float],
        notes: dict[str, dict[str, Any]],
        changes: list[str],
    ) -> None:
        """One change line and note per quantized layer, with its measured error."""
        c = self.config
        static = c["mode"] == "int8"
        errors: dict[str, float] = {}
        if reference is not None:
            names = {n.name: _output_in(quantized, n, outputs[n.name]) for n in done}
            got = capture(quantized, {k: v[:ERROR_SAMPLES] for k, v in data.items()},
                          sorted(set(names.values())))  # fmt: skip
            errors = {k: rel_error(reference[k], got[t]) for k, t in names.items()}
        for n in done:
            note = notes[n.name]
            w_err, scales = _weight_error(quantized, n, weights[n.name], static)
            # What onnxruntime did, which is not always what was asked: its ConvInteger
            # takes one weight scale per tensor even with per_channel.
            how = "per-tensor" if scales == 1 else "per-channel"
            if static:
                what = (
                    f"QDQ {c['activation_type']} activations ({c['calibration']}), "
                    f"{c['weight_type']} {how} weights"
                )
            else:
                what = f"dynamic, {c['weight_type']} {how} weights"
            note["quantized"] = what
            line = f"quantize {n.name}: {what}"
            if w_err is not None:
                note["weight_rel_error"] = w_err
            if n.name in errors:
                note["rel_error"] = errors[n.name]
                line += f", output rel. error {errors[n.name]:.2e}"
            elif w_err is not None:
                line += f", weight rel. error {w_err:.2e} (no calibration data)"
            if n.name in corrected:
                line += f", bias corrected (mean shift {corrected[n.name]:.2e})"
            changes.append(line)


# ---------------------------------------------------------------------- helpers
class _Reader:
    """onnxruntime's CalibrationDataReader over named arrays, batch by batch."""

    def __init__(self, data: Mapping[str, np.ndarray]):
        self._batches = iter_batches(data, _BATCH)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _feeds(
    model: Model, data: Mapping[str, np.ndarray] | None, samples: int, pass_name: str
) -> dict[str, np.ndarray] | None:
    """The first `samples` calibration samples, one array per model input, in its dtype."""
    if not data:
        return None
    feeds = {}
    for t in model.inputs:
        if t.name not in data:
            have = ", ".join(sorted(data)) or "none"
            raise PassError(
                f"pass {pass_name}: calibration data have no array for model input {t.name!r} "
                f"(arrays: {have})"
            )
        value = np.asarray(data[t.name])[:samples]
        feeds[t.name] = value.astype(t.dtype) if t.dtype is not None else value
    return feeds


def _calibrate(
    model: str,
    cache: str,
    data: Mapping[str, np.ndarray],
    method,
    percentile: float,
    large: bool,
) -> None:
    """Activation ranges of `model` on `data`, written where quantize_static reads them.

    onnxruntime's calibrators are driven here rather than inside quantize_static for
    two reasons: one batch at a time, so only one batch of intermediate activations is
    held in memory (histograms and ranges merge across calls); and with more histogram
    bins for entropy calibration, which quantize_static gives 128, as many as int8 has
    levels, leaving it only the full range to pick (that is, MinMax). 512 bins give it
    192 candidate thresholds; TensorRT's 2048 would make onnxruntime's pure-Python
    search over them about five times slower for little gain.
    """
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        create_calibrator,
        save_tensors_data,
    )

    options: dict[str, Any] = {}
    if method == CalibrationMethod.Entropy:
        options = {"num_bins": 512}
    elif method == CalibrationMethod.Percentile:
        options = {"num_bins": 2048, "percentile": percentile}
    calibrator = create_calibrator(
        Path(model),
        None,
        augmented_model_path=str(Path(cache).with_name("augmented.onnx")),
        calibrate_method=method,
        use_external_data_format=large,
        extra_options=options,
    )
    for batch in iter_batches(data, _BATCH):
        calibrator.collect_data(_Reader(batch))
    save_tensors_data(calibrator.compute_data(), cache)


def _pre_process(fn, src: str, dst: str, large: bool) -> None:
    """onnxruntime's pre-processing; symbolic shape inference (sympy) is optional."""
    try:
        fn(src, dst, skip_optimization=True, save_as_external_data=large)
        return
    except Exception as e:  # sympy missing, or an op the symbolic inference cannot handle
        logger.info("symbolic shape inference failed (%s); using ONNX shape inference", e)
    try:
        fn(src, dst, skip_optimization=True, skip_symbolic_shape=True, save_as_external_data=large)
    except Exception as e:
        raise PassError(f"pass quantize: pre-processing failed: {_first_line(e)}") from e


def _restore_metadata(result: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Keeps the model's own producer and metadata instead of the quantizer's."""
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(result, field, getattr(original, field))
    del result.metadata_props[:]
    result.metadata_props.extend(original.metadata_props)


def _clips_graph_output(model: Model, node: Node) -> bool:
    """A Relu/Clip reading a graph output: onnxruntime would give its input the Relu's
    range, clipping the graph output to it, so the node is left unquantized."""
    return (
        node.op in ("Relu", "Clip") and bool(node.inputs) and model.is_graph_output(node.inputs[0])
    )


def _node(model: Model, name: str) -> Node | None:
    try:
        return model.node(name)
    except KeyError:
        return None


def _is_quantized(quantized: Model, layer: Node, widx: int, static: bool) -> bool:
    node = _node(quantized, layer.name)
    if not static:
        # quantize_dynamic replaces the layer by ConvInteger/MatMulInteger named after it
        # (a Gemm after turning it into a MatMul).
        for suffix in ("_quant", "_MatMul_quant"):
            found = _node(quantized, layer.name + suffix)
            if found is not None and found.op in ("ConvInteger", "MatMulInteger"):
                return True
        return False
    if node is None or len(node.inputs) <= widx:
        return False
    producer = quantized.producer(node.inputs[widx])
    return producer is not None and producer.op == "DequantizeLinear"


def _output_in(quantized: Model, layer: Node, name: str) -> str:
    """The layer's output in the quantized model: same name, else the node's own output
    (onnxruntime renames it when it folds a following Relu into the quantization)."""
    if name in quantized.tensors():
        return name
    node = _node(quantized, layer.name)
    return node.outputs[0].name if node is not None else name


def _dequantized(
    quantized: Model, layer: Node, widx: int, static: bool, wname: str
) -> tuple[np.ndarray, int] | None:
    """The weight the quantized layer computes with and its number of scales, or None
    if it cannot be found."""
    if static:
        node = _node(quantized, layer.name)
        dq = quantized.producer(node.inputs[widx]) if node is not None else None
        if dq is None or dq.op != "DequantizeLinear":
            return None
        parts = [quantized.constant_value(t) for t in dq.inputs[:3]]
        axis = int(dq.attrs.get("axis", 1))
    else:
        # quantize_dynamic names its initializers after the weight.
        tensors = quantized.tensors()
        # A Gemm's weight with transB=1 is transposed first.
        base = next(
            (b for b in (wname, f"{wname}_Transposed") if f"{b}_quantized" in tensors), wname
        )
        parts = [
            quantized.constant_value(tensors[n]) if n in tensors else None
            for n in (f"{base}_quantized", f"{base}_scale", f"{base}_zero_point")
        ]
        axis = None
    q, scale, zero = (parts + [None] * 3)[:3]
    if q is None or scale is None:
        return None
    zero = np.zeros(1) if zero is None else zero
    q = np.asarray(q, np.float64)
    scale, zero = np.asarray(scale, np.float64), np.asarray(zero, np.float64)
    if scale.size > 1:
        if axis is None:
            axis = next((a for a in (q.ndim - 1, 0) if q.shape[a] == scale.size), 0)
        shape = [1] * q.ndim
        shape[axis % q.ndim] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape) if zero.size > 1 else zero
    return (q - zero) * scale, int(scale.size)


def _weight_error(
    quantized: Model, layer: Node, weight: tuple[int, np.ndarray], static: bool
) -> tuple[float | None, int | None]:
    """Weight-space relative error of a quantized layer and its number of weight scales."""
    widx, w = weight
    found = _dequantized(quantized, layer, widx, static, layer.inputs[widx].name)
    if found is None:
        return None, None
    deq, scales = found
    if deq.shape != w.shape and deq.ndim == 2 and deq.T.shape == w.shape:
        deq = deq.T  # quantize_dynamic transposes a Gemm's weight when transB=1
    return (rel_error(w, deq) if deq.shape == w.shape else None), scales


# ---------------------------------------------------------------------- bias correction
def _correct_biases(
    reference: Model,
    quantized: Model,
    done: list[Node],
    outputs: dict[str, str],
    data: Mapping[str, np.ndarray],
    notes: dict[str, dict[str, Any]],
) -> dict[str, float]:
    """Shifts each quantized Conv/Gemm's bias by its mean output error against the float
    model (:func:`tailor.passes._bias.correct_bias`, layer after layer); returns the
    largest shift per corrected layer.

    A missing bias is created as an int32 behind a DequantizeLinear at the input scale
    times the weight scale, the QDQ form onnxruntime fuses into QLinearConv. MatMul has
    no bias input, and no Add is inserted after a quantized layer (it would break the
    fusion), so those are left as they are.
    """
    pairs: dict[str, str] = {}
    layer_of: dict[str, str] = {}
    for layer in done:
        node = _node(quantized, layer.name)
        if node is None or node.op not in ("Conv", "Gemm"):
            notes[layer.name]["bias_correction"] = f"not applied to {layer.op} (no bias input)"
            continue
        pairs[node.outputs[0].name] = outputs[layer.name]
        layer_of[node.outputs[0].name] = layer.name
    if not pairs:
        return {}
    found = correct_bias(
        reference, quantized, pairs, data, max_samples=ERROR_SAMPLES, insert_add=False
    )
    out: dict[str, float] = {}
    for tensor, shift in found.items():
        name = layer_of[tensor]
        if isinstance(shift, str):
            notes[name]["bias_correction"] = f"not applied: {shift}"
            continue
        out[name] = float(np.max(np.abs(shift.delta))) if shift.delta.size else 0.0
        notes[name]["bias_correction"] = out[name]
    return out
