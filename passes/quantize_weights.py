"""Stores layer weights as 8-bit or 4-bit integer codes: replaces each float weight
initializer with codes and per-channel scales that a Cast/Sub/Mul (or, on request, a
DequantizeLinear) turns back into float.

Weight-only quantization saves storage, not latency: the layer still computes in float
on the decoded weight. Codes are `round(w / scale)` per output channel (or per tensor),
symmetric (`zero_point = 0`, codes in [-127, 127] or [-7, 7]) or asymmetric (codes in
[0, 255] or [0, 15] with a zero point; the range always contains 0, so zeros, such as
those `prune_weights` leaves, stay exactly zero).

Encodings (docs/storage_formats.md):

- 8 bits (`decode=arithmetic`, the default): an int8 (uint8 when asymmetric)
  initializer of the weight's shape through Cast, Sub (zero point) and Mul (scale).
  onnxruntime folds these into a float weight when the session is created, so the
  model runs as fast as the float one (measured on three trained models: 0.99-1.04x of
  the float latency, against 1.08-1.96x with DequantizeLinear;
  `python -m benchmarks.quantize_weights_latency`).
- 8 bits with `decode=dequantize_linear`, float32 weights, opset >= 13 (or >= 10 per
  tensor): the same codes into a standard DequantizeLinear, the form integer-weight
  kernels of other runtimes look for. onnxruntime does not constant-fold a
  DequantizeLinear (it keeps them for its QDQ fusions unless the session sets
  `session.disable_quant_qdq=1`), so it dequantizes every weight on every run.
- 4 bits: two codes per byte in a uint8 initializer (see
  :func:`tailor.passes._storage.pack_codes`), unpacked with integer Div and Mod, then
  Cast, Sub, Mul. ONNX's own INT4 type needs opset 21, and onnx-graphsurgeon 0.6 cannot
  write INT4 initializers back, so it is not used.
"""

from __future__ import annotations

import logging

import numpy as np

from tailor.errors import ParameterError
from tailor.ir.model import Tensor
from tailor.passes._storage import (
    Decoder,
    Encoded,
    WeightSite,
    pack_codes,
    run_storage_pass,
)
from tailor.passes.base import Param, Pass, PassContext, PassResult
from tailor.passes.registry import register

__all__ = ["QuantizeWeights", "quantize_array"]

logger = logging.getLogger(__name__)

DECODES = ("arithmetic", "dequantize_linear")


def quantize_array(
    w: np.ndarray, bits: int, axis: int | None, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer codes of `w` with scales and zero points along `axis` (None: per tensor).

    Returns:
        `(codes, scale, zero_point)`: codes int64 of `w`'s shape; scale float32 and
        zero point int64 shaped to broadcast against `w` (size 1 on every other axis).
        `(codes - zero_point) * scale` is the decoded weight.
    """
    w64 = np.asarray(w, np.float64)
    reduce = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = np.max(np.abs(w64), axis=reduce, keepdims=True)
        scale = (amax / qmax).astype(np.float32)
        low, high = -qmax, qmax
        zero = np.zeros_like(scale, dtype=np.int64)
    else:
        qmax = 2**bits - 1
        lo = np.minimum(np.min(w64, axis=reduce, keepdims=True), 0.0)
        hi = np.maximum(np.max(w64, axis=reduce, keepdims=True), 0.0)
        scale = ((hi - lo) / qmax).astype(np.float32)
        low, high = 0, qmax
        zero = None
    # An all-zero channel: any scale decodes it exactly; 1 avoids dividing by zero.
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    if zero is None:
        zero = np.clip(np.rint(-lo / scale), 0, qmax).astype(np.int64)
    codes = np.clip(np.rint(w64 / scale) + zero, low, high).astype(np.int64)
    return codes, scale, zero


@register
class QuantizeWeights(Pass):
    """Stores layer weights as int8 or 4-bit codes dequantized at run time; saves storage, not latency.

    Each selected Conv, ConvTranspose, Gemm or MatMul weight becomes integer codes plus
    a float scale per output channel (`per_channel`) or per tensor, decoded by a
    Cast/Sub/Mul chain that onnxruntime folds at load (so inference runs at float speed),
    or with `decode=dequantize_linear` by a DequantizeLinear (8 bits, opset >= 13 or per
    tensor >= 10), which onnxruntime runs on every inference (1.1-2x slower here);
    4-bit codes are packed two per byte. The layer still computes in float, so latency
    does not improve. A weight whose encoding would not be smaller, or that a layer
    outside the selector also reads, is left alone (noted).
    """

    name = "quantize_weights"
    params = (
        Param("bits", "int", 8, "bits per weight code: 8 or 4", low=4, high=8, search=(8, 4)),
        Param("per_channel", "bool", True, "one scale per output channel (else per tensor)"),
        Param("symmetric", "bool", True, "zero point 0 (else an asymmetric range with one)"),
        Param(
            "decode",
            "choice",
            "arithmetic",
            "how 8-bit codes are decoded: arithmetic (Cast/Sub/Mul) or dequantize_linear",
            choices=DECODES,
        ),
    )

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.config["bits"] not in (4, 8):
            raise ParameterError(
                f"pass {self.name}: parameter bits={self.config['bits']} is not supported (use 8 or 4)"
            )

    def run(self, model, context: PassContext) -> PassResult:
        return run_storage_pass(self, model, context, self._encode)

    def _encode(self, dec: Decoder, site: WeightSite, hint: str) -> Encoded | str:
        bits, symmetric = self.config["bits"], self.config["symmetric"]
        per_channel = self.config["per_channel"]
        w = site.value
        axis = site.axis if per_channel else None
        codes, scale, zero = quantize_array(w, bits, axis, symmetric)
        channels = scale.size
        opset = dec.model.opset
        use_dq = (
            self.config["decode"] == "dequantize_linear"
            and bits == 8
            and w.dtype == np.float32
            and opset >= (13 if per_channel else 10)
        )
        code_bytes = codes.size if bits == 8 else (codes.size + 1) // 2
        zero_bytes = 0 if symmetric and bits == 8 else channels * (1 if use_dq else w.itemsize)
        planned = code_bytes + channels * (4 if use_dq else w.itemsize) + zero_bytes
        if planned >= w.nbytes:
            return f"{bits}-bit codes would take {planned:,} bytes, not fewer than {w.nbytes:,}"
        if use_dq:
            decoded_t = self._dequantize_linear(dec, site, codes, scale, zero, axis, hint)
        else:
            decoded_t = self._arithmetic(dec, site, codes, scale, zero, hint)
        decoded = ((codes - zero) * scale.astype(np.float64)).astype(w.dtype)
        how = "per-channel" if per_channel else "per-tensor"
        kind = "symmetric" if symmetric else "asymmetric"
        via = "DequantizeLinear" if use_dq else "Cast/Sub/Mul"
        return Encoded(
            decoded_t,
            decoded,
            f"int{bits} {how} {kind} via {via}",
            {"bits": bits, "per_channel": per_channel, "symmetric": symmetric, "decode": via},
        )

    def _dequantize_linear(self, dec, site, codes, scale, zero, axis, hint) -> Tensor:
        symmetric = self.config["symmetric"]
        stored = codes.astype(np.int8 if symmetric else np.uint8)
        inputs = [dec.const(f"{hint}_q", stored), dec.const(f"{hint}_scale", scale.reshape(-1))]
        if axis is None:
            inputs[1] = dec.const(f"{hint}_scale", scale.reshape(()))
        if not symmetric:
            zp = zero.astype(np.uint8)
            inputs.append(
                dec.const(f"{hint}_zero", zp.reshape(-1) if axis is not None else zp.reshape(()))
            )
        attrs = {"axis": axis} if axis is not None else None
        return dec.op("DequantizeLinear", inputs, f"{hint}_dequantize", attrs)

    def _arithmetic(self, dec, site, codes, scale, zero, hint) -> Tensor:
        w = site.value
        if self.config["bits"] == 8:
            stored = codes.astype(np.int8 if self.config["symmetric"] else np.uint8)
            values = dec.cast(dec.const(f"{hint}_q", stored), w.dtype, f"{hint}_codes")
        else:
            offset = 8 if self.config["symmetric"] else 0
            # Signed 4-bit codes are stored offset by 8, so every code is 0..15.
            ints = dec.unpack(pack_codes(codes + offset, 4), 4, codes.size, hint)
            ints = dec.reshape(ints, w.shape, f"{hint}_shaped")
            values = dec.cast(ints, w.dtype, f"{hint}_codes")
            zero = zero + offset
        if np.any(zero):
            zp = zero.astype(w.dtype)
            if zp.size == 1:
                zp = zp.reshape(())
            values = dec.op("Sub", [values, dec.const(f"{hint}_zero", zp)], f"{hint}_centred")
        s = scale.astype(w.dtype)
        if s.size == 1:
            s = s.reshape(())
        return dec.op("Mul", [values, dec.const(f"{hint}_scale", s)], f"{hint}_dequantize")
