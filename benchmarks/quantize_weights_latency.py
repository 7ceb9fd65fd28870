"""Measures whether int8 weight storage costs onnxruntime latency: the trained benchmark
models with `quantize_weights(bits=8)` decoded by a DequantizeLinear or by Cast/Mul,
under several onnxruntime session settings, against the float model.

A benchmark script, never imported by tailor (needs the cached trained models of
benchmarks/models.py). Run from the repository root::

    python -m benchmarks.quantize_weights_latency [--models resnet,vgg,hapt] [--runs 400]

For each model and weight form, and each session setting (`ORT_ENABLE_ALL`, the
default; `ORT_ENABLE_BASIC`; `ORT_ENABLE_ALL` with `session.disable_quant_qdq=1`), it
records the batch-1 CPU latency on one intra-op thread (median and quartiles of `--runs`
runs, spread in rounds over all variants of a model so the shared machine's load hits
them alike), the session creation time, and the decode ops left in the graph onnxruntime
actually runs (its optimized model, written with `optimized_model_filepath`): a
DequantizeLinear still there dequantizes the weight on every run. Writes
`benchmarks/results/quantize_weights_latency.json` and `.md`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks import models as bench_models
from benchmarks.models import RESULTS_DIR, machine_info, write_json_atomic
from tailor.api import run_pipeline
from tailor.ir import Model

__all__ = ["FORMS", "SESSIONS", "main"]

logger = logging.getLogger(__name__)

#: The weight forms compared, by label: pipeline text.
FORMS = {
    "float": "fuse",
    "int8, DequantizeLinear": "fuse,quantize_weights(bits=8,decode=dequantize_linear)",
    "int8, Cast/Mul": "fuse,quantize_weights(bits=8,decode=arithmetic)",
    "int4, packed": "fuse,quantize_weights(bits=4)",
}
#: Session settings compared, by label: (optimization level, config entries).
SESSIONS: dict[str, tuple[Any, dict[str, str]]] = {
    "ORT_ENABLE_ALL (default)": (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, {}),
    "ORT_ENABLE_BASIC": (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, {}),
    "ORT_ENABLE_ALL, disable_quant_qdq=1": (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        {"session.disable_quant_qdq": "1"},
    ),
}
_DECODE_OPS = ("DequantizeLinear", "Cast", "Mul", "Mod", "Div")


def _session(model: bytes, setting: str, optimized: Path | None = None) -> ort.InferenceSession:
    level, entries = SESSIONS[setting]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = level
    # Saving the optimized graph warns that it is machine-specific; it is only read here.
    opts.log_severity_level = 3
    for key, value in entries.items():
        opts.add_session_config_entry(key, value)
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _ops_run(model: bytes, setting: str) -> dict[str, int]:
    """Decode ops left in the graph onnxruntime runs after its optimizations."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        _session(model, setting, path)
        graph = onnx.load(str(path)).graph
    counts = Counter(n.op_type for n in graph.node)
    return {op: counts.get(op, 0) for op in _DECODE_OPS}


def _latencies(
    models: dict[str, bytes], sample: np.ndarray, runs: int, rounds: int = 10
) -> dict[str, dict[str, float]]:
    sessions = {}
    for key, model in models.items():
        form, setting = key.split(" | ")
        start = time.perf_counter()
        sess = _session(model, setting)
        load_ms = (time.perf_counter() - start) * 1e3
        feed = {sess.get_inputs()[0].name: sample}
        for _ in range(20):
            sess.run(None, feed)
        sessions[key] = (sess, feed, load_ms)
    times: dict[str, list[float]] = {key: [] for key in models}
    for _ in range(rounds):
        for key, (sess, feed, _) in sessions.items():
            for _ in range(max(1, runs // rounds)):
                start = time.perf_counter_ns()
                sess.run(None, feed)
                times[key].append((time.perf_counter_ns() - start) / 1e6)
    out = {}
    for key, values in times.items():
        q = statistics.quantiles(values, n=4)
        out[key] = {
            "median_ms": statistics.median(values),
            "q1_ms": q[0],
            "q3_ms": q[2],
            "session_ms": sessions[key][2],
        }
    return out


def measure(name: str, runs: int) -> list[dict[str, Any]]:
    """Rows for one cached trained model: every form under every session setting."""
    cached = bench_models.ensure_model(name)
    data = cached.load_data()
    source = Model.load(cached.onnx_path)
    forms = {label: run_pipeline(source, text).model.to_proto() for label, text in FORMS.items()}
    blobs = {label: proto.SerializeToString() for label, proto in forms.items()}
    variants = {f"{form} | {setting}": blobs[form] for form in FORMS for setting in SESSIONS}
    timing = _latencies(variants, data["test_x"][:1], runs)
    rows = []
    for key, stats in timing.items():
        form, setting = key.split(" | ")
        base = timing[f"float | {setting}"]["median_ms"]
        rows.append(
            {
                "model": name,
                "form": form,
                "pipeline": FORMS[form],
                "session": setting,
                "bytes": len(blobs[form]),
                **stats,
                "vs_float_same_session": stats["median_ms"] / base,
                "ops_run": _ops_run(blobs[form], setting),
            }
        )
        print(rows[-1], flush=True)
    return rows


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "# int8 weight storage and onnxruntime latency",
        "",
        f"Measured {meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
        f"onnxruntime {ort.__version__}; batch 1, 1 intra-op thread, {meta['runs']} runs. "
        "Generated by `python -m benchmarks.quantize_weights_latency`.",
        "",
        "| model | weights | session | bytes | median ms [q1–q3] | vs float | session ms | "
        "DequantizeLinear / Cast left |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ops = r["ops_run"]
        lines.append(
            f"| {r['model']} | {r['form']} | {r['session']} | {r['bytes']:,} | "
            f"{r['median_ms']:.3f} [{r['q1_ms']:.3f}–{r['q3_ms']:.3f}] | "
            f"{r['vs_float_same_session']:.2f}x | {r['session_ms']:.0f} | "
            f"{ops['DequantizeLinear']} / {ops['Cast']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line entry: measures and writes the result files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(bench_models.SPECS))
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--save-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = [row for name in args.models.split(",") if name for row in measure(name, args.runs)]
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "runs": args.runs,
    }
    write_json_atomic(args.save_dir / "quantize_weights_latency.json", {**meta, "rows": rows})
    text = render(rows, meta)
    (args.save_dir / "quantize_weights_latency.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
