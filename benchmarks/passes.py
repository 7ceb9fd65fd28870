"""Replaces claims about the compression passes with measurements: runs each pass setting
on the real trained models of benchmarks/models.py and records accuracy, storage, MACs
and onnxruntime CPU latency beside the uncompressed baseline and beside
`onnxruntime.quantization` as the peer.

A benchmark script, never imported by tailor (needs `pip install -e .[bench]` and the
offline datasets of benchmarks/data.py). Run from the repository root::

    python -m benchmarks.passes [--models resnet,vgg,hapt] [--only prune,quantize]
                                [--runs 300] [--save-dir DIR]

For each model and setting it runs `tailor.api.run_pipeline(model, pipeline,
calibration={input: calib_x})` (512 training inputs) and measures the result:

- **accuracy**: top-1 on the whole test set in onnxruntime (CPU), and its change from
  the baseline in points;
- **storage**: bytes of the serialized model, and of the same bytes zlib-compressed
  (what a download or a flash image costs; it shows what sparsity and codebooks save);
- **MACs**: `tailor.ir.layers.summarize` on the result. Quantized models hide their
  weights behind DequantizeLinear / integer ops, where summarize sees no layer; their
  MACs are the float model's (the same count, done in int8), and the row says so;
- **latency**: onnxruntime CPU, batch 1, `--latency-threads` intra-op threads (1 by
  default), median and interquartile range of `--runs` runs after `--warmup` runs; the
  runs of all settings of a model are interleaved in rounds, so a change in the shared
  machine's load affects every setting alike.

A setting whose pass is not registered, fails, or yields a model onnxruntime cannot run
becomes an error row with a one-line message; the run goes on. Results are merged into
`benchmarks/results/passes.json` (one row per model and setting; a filtered run replaces
only its own rows) and rendered to `benchmarks/results/passes.md`, both written
atomically, with the machine, versions, date and the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# One BLAS/LAPACK thread unless the user chose otherwise. OpenBLAS (numpy's SVD and
# eigh, scipy's lstsq and Cholesky in the passes) starts one thread per core and its
# threads busy-wait for each other; on this 2-core machine they compete with
# onnxruntime's intra-op threads (the calibration captures and the latency runs) and
# with other processes, and a factorization then runs many times slower than on one
# thread. The variables are read once, when the BLAS library loads, so they must be set
# before numpy (or anything importing it) is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from benchmarks import models as bench_models  # noqa: E402
from benchmarks.models import (  # noqa: E402
    RESULTS_DIR,
    machine_info,
    ort_accuracy,
    write_json_atomic,
)
from tailor import __version__ as tailor_version  # noqa: E402
from tailor.api import load, run_pipeline  # noqa: E402
from tailor.ir.layers import summarize  # noqa: E402
from tailor.ir.model import Model  # noqa: E402
from tailor.passes import available_passes, parse_pipeline  # noqa: E402

__all__ = [
    "Setting",
    "SETTINGS",
    "PEERS",
    "measure",
    "interleaved_latency",
    "render_markdown",
    "main",
]

logger = logging.getLogger(__name__)

#: Ops that do a layer's multiply-accumulates; summarize counts only the float ones.
_COMPUTE_OPS = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "ConvInteger",
    "MatMulInteger",
    "QLinearConv",
    "QLinearMatMul",
}


@dataclass(frozen=True)
class Setting:
    """One row of the benchmark: a label and the pipeline text that produces it."""

    label: str
    pipeline: str
    group: str


def _s(label: str, group: str, prefix: str = "fuse,") -> Setting:
    # Every compression runs after `fuse`, as a user's pipeline would; the peer's
    # pre-processing folds BatchNormalization too, so both start from the same graph.
    return Setting(label, prefix + label if label != "fuse" else "fuse", group)


SETTINGS: tuple[Setting, ...] = (
    _s("fuse", "lossless"),
    _s("prune_channels(ratio=0.3)", "prune"),
    _s("prune_channels(ratio=0.3,reconstruct=false)", "prune"),
    _s("prune_channels(ratio=0.5)", "prune"),
    _s("prune_channels(ratio=0.5,reconstruct=false)", "prune"),
    _s("prune_channels(ratio=0.5,criterion=activation)", "prune"),
    _s("prune_channels(ratio=0.3,criterion=refit)", "prune"),
    _s("prune_channels(ratio=0.5,criterion=refit)", "prune"),
    # Ranking by BatchNormalization scales needs the BN nodes that `fuse` folds away.
    _s("prune_channels(ratio=0.5,criterion=bn_scale),fuse", "prune", prefix=""),
    _s("svd(rank=0.25)", "low-rank"),
    _s("svd(rank=0.5)", "low-rank"),
    _s("tucker2(rank=0.5)", "low-rank"),
    _s("spatial_svd(rank=0.5)", "low-rank"),
    _s("depthwise_separable(rank=2)", "low-rank"),
    _s("depthwise_separable(rank=4)", "low-rank"),
    _s("quantize(mode=int8)", "quantize"),
    _s("quantize(mode=dynamic)", "quantize"),
    _s("prune_weights(sparsity=0.5)", "storage"),
    _s("prune_weights(sparsity=0.8)", "storage"),
    _s("quantize_weights(bits=8)", "storage"),
    _s("quantize_weights(bits=4)", "storage"),
    _s("cluster_weights(clusters=16)", "storage"),
)

#: The peer: onnxruntime.quantization on the same model and calibration data.
PEERS: tuple[Setting, ...] = (
    Setting(
        "peer: ort quantize_static (QDQ, per-channel, MinMax)",
        "onnxruntime.quantization.quantize_static",
        "peer",
    ),
    Setting(
        "peer: ort quantize_dynamic (per-channel)",
        "onnxruntime.quantization.quantize_dynamic",
        "peer",
    ),
)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _jsonable(value: Any) -> Any:
    """Per-layer notes hold numpy scalars and tuples; JSON wants plain types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def interleaved_latency(
    models: dict[str, bytes],
    sample: np.ndarray,
    *,
    runs: int,
    warmup: int,
    threads: int,
    rounds: int = 10,
) -> dict[str, dict[str, float]]:
    """Batch-1 onnxruntime CPU latency of several models, in ms: median, quartiles, min.

    The timed runs are spread over `rounds` round-robin passes over all models, so a
    change in the machine's load (it is shared) hits every model alike instead of
    whichever happened to be measured at that moment.

    Raises:
        Exception: whatever onnxruntime raises for a model it cannot load or run.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {}
    for key, model_bytes in models.items():
        sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: sample}
        for _ in range(warmup):
            sess.run(None, feed)
        sessions[key] = (sess, feed)
    times: dict[str, list[float]] = {key: [] for key in models}
    per_round = max(1, -(-runs // rounds))
    for _ in range(rounds):
        for key, (sess, feed) in sessions.items():
            for _ in range(per_round):
                start = time.perf_counter_ns()
                sess.run(None, feed)
                times[key].append((time.perf_counter_ns() - start) / 1e6)
    stats = {}
    for key, values in times.items():
        q1, median, q3 = statistics.quantiles(values, n=4)
        stats[key] = {"median": median, "q1": q1, "q3": q3, "min": min(values), "runs": len(values)}
    return stats


def _macs(model: Model, float_macs: int | None) -> tuple[int | None, str, int]:
    """(MACs, note, params) of a result; quantized weights are invisible to summarize."""
    model = model.copy()
    model.infer_shapes()
    summary = summarize(model)
    compute = sum(1 for n in model.nodes if n.op in _COMPUTE_OPS)
    if len(summary.layers) < compute:
        hidden = compute - len(summary.layers)
        return (
            float_macs,
            f"{hidden} of {compute} layers compute with decoded or integer weights: "
            "MACs counted as in the float model",
            summary.params,
        )
    return summary.macs, "", summary.params


def measure(
    model_bytes: bytes,
    model: Model,
    data: dict[str, np.ndarray],
    *,
    float_macs: int | None,
    eval_threads: int,
) -> dict[str, Any]:
    """Accuracy, storage and MACs of one model (latency: :func:`interleaved_latency`)."""
    macs, note, params = _macs(model, float_macs)
    accuracy = ort_accuracy(model_bytes, data["test_x"], data["test_y"], threads=eval_threads)
    return {
        "accuracy": accuracy,
        "bytes": len(model_bytes),
        "zlib_bytes": len(zlib.compress(model_bytes, 9)),
        "params": params,
        "macs": macs,
        "macs_note": note,
    }


def _ort_peer(
    setting: Setting, model_path: Path, calib: np.ndarray, input_name: str
) -> tuple[bytes, str]:
    """The peer's quantized model: onnxruntime's pre-processing, then its quantizer."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calib[i : i + 32] for i in range(0, len(calib), 32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory(prefix="tailor-peer-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "out.onnx"
        quant_pre_process(str(model_path), str(pre))
        if setting.pipeline.endswith("quantize_static"):
            quantize_static(
                str(pre),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            how = "quant_pre_process, quantize_static(QDQ, per_channel, QInt8/QInt8, MinMax)"
        else:
            quantize_dynamic(str(pre), str(out), per_channel=True, weight_type=QuantType.QInt8)
            how = "quant_pre_process, quantize_dynamic(per_channel, QInt8)"
        return out.read_bytes(), how


def _record(record: Any, *, brief: bool) -> dict[str, Any]:
    """A pass record as JSON; `brief` (a leading `fuse`, the same in every row) keeps only
    the count of its changes, which the `fuse` row lists in full."""
    out = {"text": record.text, "modified": record.modified, "seconds": round(record.seconds, 2)}
    if brief:
        return out | {"changes": len(record.changes)}
    return out | {"changes": list(record.changes), "layer_notes": _jsonable(record.layer_notes)}


def _missing_passes(pipeline: str) -> list[str]:
    registered = available_passes()
    return [c.name for c in parse_pipeline(pipeline).calls if c.name.lower() not in registered]


def _run_setting(
    setting: Setting,
    cached: bench_models.CachedModel,
    data: dict[str, np.ndarray],
    input_name: str,
    save_dir: Path | None,
    measure_kw: dict[str, Any],
) -> tuple[dict[str, Any], bytes | None]:
    """The row of one setting and its model's bytes (None when it failed)."""
    row: dict[str, Any] = {"setting": setting.label, "group": setting.group}
    model_bytes = None
    start = time.perf_counter()
    try:
        if setting.group == "peer":
            model_bytes, how = _ort_peer(setting, cached.onnx_path, data["calib_x"], input_name)
            row["pipeline"] = how
            row["records"] = []
        else:
            missing = _missing_passes(setting.pipeline)
            if missing:
                row.update(
                    pipeline=setting.pipeline,
                    status="error",
                    error=f"pass {', '.join(missing)} is not registered (passes/_builtin.py)",
                )
                return row, None
            result = run_pipeline(
                cached.onnx_path,
                setting.pipeline,
                calibration={input_name: data["calib_x"]},
            )
            model_bytes = result.model.to_bytes()
            row["pipeline"] = result.pipeline
            row["records"] = [
                _record(r, brief=i < len(result.records) - 1 and r.text == "fuse")
                for i, r in enumerate(result.records)
            ]
        row["compress_seconds"] = round(time.perf_counter() - start, 2)
        if save_dir is not None:
            safe = "".join(c if c.isalnum() or c in "=._-" else "_" for c in setting.label)
            (save_dir / cached.name).mkdir(parents=True, exist_ok=True)
            (save_dir / cached.name / f"{safe}.onnx").write_bytes(model_bytes)
        model = load(model_bytes)
        row.update(measure(model_bytes, model, data, **measure_kw))
        row["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as e:  # one failing setting is data, not the end of the benchmark
        logger.debug("setting %s failed:\n%s", setting.label, traceback.format_exc())
        row.setdefault("pipeline", setting.pipeline)
        row.update(status="error", error=_first_line(e))
        row["compress_seconds"] = round(time.perf_counter() - start, 2)
        return row, None
    return row, model_bytes


def _fmt_row(model: str, row: dict[str, Any], base: dict[str, Any] | None) -> str:
    if row.get("status") != "ok":
        return f"{row['setting']}: ERROR {row.get('error', '')}"
    delta = "" if base is None else f" ({100 * (row['accuracy'] - base['accuracy']):+.2f} pts)"
    macs = "?" if row["macs"] is None else f"{row['macs'] / 1e6:.2f} M"
    return (
        f"{row['setting']}: acc {row['accuracy']:.4f}{delta}, {row['bytes'] / 1024:.1f} KiB, "
        f"{macs} MACs"
        + (f" [{row['compress_seconds']:.1f} s]" if "compress_seconds" in row else "")
    )


# -- report ----------------------------------------------------------------------------


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    return f" ({value / base:.2f}x)"


def _checks(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets and the reconstruction comparison, from the measured rows."""
    by = {(r["model"], r["setting"]): r for r in rows}

    def acc(model: str, setting: str) -> float | None:
        r = by.get((model, setting))
        return r["accuracy"] if r and r.get("status") == "ok" else None

    lines = []
    base = acc("resnet", "baseline")
    for setting, limit, what in (
        ("prune_channels(ratio=0.5)", 2.0, "50 % channel pruning with reconstruction, l1 ranking"),
        (
            "prune_channels(ratio=0.5,criterion=refit)",
            2.0,
            "50 % channel pruning with reconstruction, least-squares channel selection",
        ),
        ("quantize(mode=int8)", 0.5, "int8 static quantization"),
    ):
        value = acc("resnet", setting)
        if base is None or value is None:
            lines.append(f"- ResNet-ish, {what} (`{setting}`): not measured")
            continue
        drop = 100 * (base - value)
        verdict = "met" if drop <= limit else "NOT met"
        lines.append(
            f"- ResNet-ish, {what} (`{setting}`): loses {drop:.2f} points "
            f"(target at most {limit}): **{verdict}**"
        )
    for model in sorted({r["model"] for r in rows}):
        for ratio in ("0.3", "0.5"):
            with_r = acc(model, f"prune_channels(ratio={ratio})")
            without = acc(model, f"prune_channels(ratio={ratio},reconstruct=false)")
            if with_r is None or without is None:
                continue
            gain = 100 * (with_r - without)
            lines.append(
                f"- {model}, ratio {ratio}: reconstruction {with_r:.4f} vs prune-and-do-nothing "
                f"{without:.4f} ({gain:+.2f} points): "
                + ("**reconstruction better**" if gain > 0 else "**reconstruction NOT better**")
            )
    return lines


def _change_note(row: dict[str, Any]) -> str:
    """What the last pass of a setting did, in a few words (the JSON has every line)."""
    records = [r for r in row.get("records") or [] if r["text"] != "fuse"]
    if not records or row["group"] in ("baseline", "lossless"):
        return ""
    last = records[-1]
    if not last["modified"]:
        return "changed nothing"
    notes = last.get("layer_notes", {})
    skipped = sum(1 for n in notes.values() if isinstance(n, dict) and "skipped" in n)
    text = f"{len(last['changes'])} change(s)"
    return text + (f", {skipped} layer(s) skipped" if skipped else "")


def render_markdown(payload: dict[str, Any]) -> str:
    """The results as a markdown report: header, checks, one table per model."""
    meta = payload["meta"]
    machine = meta["machine"]
    rows = payload["rows"]
    out = [
        "# tailor passes on real trained models",
        "",
        f"Generated by `python -m benchmarks.passes` on {meta['date']}; tailor {meta['tailor']}, "
        f"python {machine['python']}, onnx {machine['onnx']}, onnxruntime {machine['onnxruntime']}, "
        f"numpy {machine['numpy']}, torch {machine['torch']}.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['platform']}); "
        f"load average {meta.get('load_average', '?')} at the start (the machine is shared, "
        "so latencies carry that noise).",
        f"Latency: onnxruntime CPU, batch 1, {meta['latency_threads']} intra-op thread(s), "
        f"median of {meta['runs']} runs after {meta['warmup']} warm-up runs, interleaved over all "
        "settings of a model in 10 rounds (IQR in brackets). "
        "Accuracy: top-1 on the full test set. Storage: serialized bytes (zlib -9 in brackets). "
        "Calibration: 512 training inputs. Every tailor setting runs after `fuse` (the "
        "bn_scale one before it: it ranks channels by BatchNormalization scales); "
        "passes.json has each exact pipeline and every pass's per-layer notes.",
        "",
        "## Checks",
        "",
        *_checks(rows),
        "",
    ]
    for model in payload.get("model_order", sorted({r["model"] for r in rows})):
        mrows = [r for r in rows if r["model"] == model]
        if not mrows:
            continue
        info = payload.get("models", {}).get(model, {})
        base = next(
            (r for r in mrows if r["setting"] == "baseline" and r.get("status") == "ok"), None
        )
        out += [f"## {model}", ""]
        if info:
            out += [f"{info.get('architecture', '')} on {info.get('dataset', '')}", ""]
        out += [
            "| setting | accuracy | Δ points | storage KiB | MACs M | latency ms | compress s | note |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in mrows:
            if r.get("status") != "ok":
                out.append(
                    f"| {r['setting']} | — | — | — | — | — | — | error: {r.get('error', '')} |"
                )
                continue
            lat = r.get("latency_ms") or {
                "median": float("nan"),
                "q1": float("nan"),
                "q3": float("nan"),
            }
            delta = "" if base is None else f"{100 * (r['accuracy'] - base['accuracy']):+.2f}"
            storage = (
                f"{r['bytes'] / 1024:.1f}{_ratio(r['bytes'], base and base['bytes'])} "
                f"[{r['zlib_bytes'] / 1024:.1f}]"
            )
            macs = (
                "?"
                if r["macs"] is None
                else f"{r['macs'] / 1e6:.2f}{_ratio(r['macs'], base and base['macs'])}"
            )
            latency = (
                f"{lat['median']:.3f}{_ratio(lat['median'], base and base.get('latency_ms', {}).get('median'))} "
                f"[{lat['q1']:.3f}–{lat['q3']:.3f}]"
            )
            secs = f"{r['compress_seconds']:.1f}" if "compress_seconds" in r else ""
            note = "; ".join(x for x in (_change_note(r), r.get("macs_note", "")) if x)
            out.append(
                f"| {r['setting']} | {r['accuracy']:.4f} | {delta} | {storage} | {macs} | "
                f"{latency} | {secs} | {note} |"
            )
        out.append("")
    return "\n".join(out)


def _write_text_atomic(path: Path, text: str) -> None:
    bench_models._write_atomic(path, lambda f: f.write(text.encode()))


def main(argv: list[str] | None = None) -> None:
    """Runs the settings on the models, merges into passes.json and renders passes.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(bench_models.SPECS))
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated substrings; run only settings whose label contains one "
        "(e.g. prune,quantize,peer); the baseline always runs",
    )
    parser.add_argument("--runs", type=int, default=300, help="timed latency runs")
    parser.add_argument("--warmup", type=int, default=30, help="untimed latency runs first")
    parser.add_argument("--latency-threads", type=int, default=1)
    parser.add_argument("--eval-threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="trained models (see benchmarks.models)")
    parser.add_argument("--save-dir", type=Path, default=None, help="keep every result .onnx here")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("-v", "--verbose", action="store_true", help="log tracebacks of errors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    for noisy in ("onnxruntime", "root"):  # the quantizer logs every node at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in bench_models.SPECS]
    if unknown:
        parser.error(
            f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(bench_models.SPECS)}"
        )
    patterns = [p.strip().lower() for p in args.only.split(",") if p.strip()]
    settings = [
        s
        for s in (*SETTINGS, *PEERS)
        if not patterns or any(p in s.label.lower() for p in patterns)
    ]
    json_path = args.results_dir / "passes.json"
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    measure_kw = {"eval_threads": args.eval_threads}
    date = datetime.now(UTC).isoformat(timespec="seconds")
    load_avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{len(settings)} setting(s) on {', '.join(names)}; passes registered: "
        f"{', '.join(available_passes())}",
        flush=True,
    )
    new_rows: list[dict[str, Any]] = []
    model_info: dict[str, Any] = dict(previous.get("models", {}))
    for name in names:
        cached = bench_models.ensure_model(name, cache=args.cache_dir)
        data = cached.load_data()
        model_bytes = cached.onnx_path.read_bytes()
        base_model = load(model_bytes)
        input_name = base_model.inputs[0].name
        model_info[name] = {
            "architecture": cached.meta["spec"]["architecture"],
            "dataset": cached.meta["dataset"],
            "cache_folder": cached.folder.name,
            "onnx_sha256": cached.meta["onnx_sha256"],
            "test_samples": cached.meta["test_samples"],
        }
        total = len(settings) + 1
        print(f"[{name} 1/{total}] baseline", flush=True)
        base = {
            "model": name,
            "setting": "baseline",
            "group": "baseline",
            "pipeline": "",
            "date": date,
        }
        timed: dict[int, tuple[dict[str, Any], bytes]] = {}
        try:
            base.update(measure(model_bytes, base_model, data, float_macs=None, **measure_kw))
            base["status"] = "ok"
            timed[id(base)] = (base, model_bytes)
        except Exception as e:
            base.update(status="error", error=_first_line(e))
        print(f"  {_fmt_row(name, base, None)}", flush=True)
        rows_of_model = [base]
        float_macs = base.get("macs")
        for i, setting in enumerate(settings, start=2):
            print(f"[{name} {i}/{total}] {setting.label}", flush=True)
            row, result_bytes = _run_setting(
                setting,
                cached,
                data,
                input_name,
                args.save_dir,
                measure_kw | {"float_macs": float_macs},
            )
            row = {"model": name, "date": date} | row
            rows_of_model.append(row)
            if result_bytes is not None:
                timed[id(row)] = (row, result_bytes)
            print(
                f"  {_fmt_row(name, row, base if base.get('status') == 'ok' else None)}", flush=True
            )
        print(
            f"[{name}] latency of {len(timed)} model(s): {args.runs} runs each, interleaved",
            flush=True,
        )
        try:
            stats = interleaved_latency(
                {str(k): b for k, (_, b) in timed.items()},
                data["test_x"][:1],
                runs=args.runs,
                warmup=args.warmup,
                threads=args.latency_threads,
            )
        except Exception as e:  # measure one by one to find the model that fails
            stats = {}
            for k, (row, b) in timed.items():
                try:
                    stats |= interleaved_latency(
                        {str(k): b},
                        data["test_x"][:1],
                        runs=args.runs,
                        warmup=args.warmup,
                        threads=args.latency_threads,
                    )
                except Exception as e2:
                    row.update(status="error", error=f"latency: {_first_line(e2)}")
            logger.debug("interleaved latency failed: %s", e)
        for k, (row, _) in timed.items():
            if str(k) in stats:
                row["latency_ms"] = stats[str(k)]
                print(f"  {row['setting']}: {stats[str(k)]['median']:.3f} ms", flush=True)
        new_rows.extend(rows_of_model)

    # Merge: a filtered run replaces only the rows it measured, in the canonical order.
    merged = {(r["model"], r["setting"]): r for r in previous.get("rows", [])}
    merged.update({(r["model"], r["setting"]): r for r in new_rows})
    order = ["baseline", *(s.label for s in (*SETTINGS, *PEERS))]
    model_order = [m for m in bench_models.SPECS if any(k[0] == m for k in merged)]
    rows = sorted(
        merged.values(),
        key=lambda r: (
            model_order.index(r["model"]) if r["model"] in model_order else 99,
            order.index(r["setting"]) if r["setting"] in order else 99,
        ),
    )
    payload = {
        "meta": {
            "date": date,
            "tailor": tailor_version,
            "machine": machine_info(),
            "load_average": load_avg,
            "runs": args.runs,
            "warmup": args.warmup,
            "latency_threads": args.latency_threads,
            "eval_threads": args.eval_threads,
            "registered_passes": list(available_passes()),
        },
        "model_order": model_order,
        "models": model_info,
        "rows": rows,
    }
    write_json_atomic(json_path, payload)
    _write_text_atomic(args.results_dir / "passes.md", render_markdown(payload))
    print(f"wrote {json_path} and {args.results_dir / 'passes.md'}")


if __name__ == "__main__":
    main()
