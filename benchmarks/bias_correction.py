"""Measures what bias correction does for `quantize(mode=int8)` and the low-rank passes:
accuracy and logits error with `bias_correction` off and on, and the pass's time.

A benchmark script, never imported by tailor (needs `pip install -e .[bench]`, the cached
trained models of benchmarks/models.py and, for the reference architectures, torch). Run
from the repository root::

    python -m benchmarks.bias_correction --label NAME [--models resnet,vgg,hapt]
                                         [--architectures] [--save PATH]

For each trained model: 512 calibration inputs (`calib_x`), top-1 accuracy on the whole
test set and the relative error `||y' - y|| / ||y||` of the logits against the float
model on the first 1,000 test inputs. For each reference architecture of
tests/architectures.py (random weights, `--architectures`): 32 random calibration
inputs and the logits' error on 64 held-out random inputs. Rows are merged into the
result file (default `benchmarks/results/bias_correction.json`) under `--label`, so two
implementations can be compared side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

# One BLAS thread unless the user chose otherwise: benchmarks/passes.py says why.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from benchmarks import models as bench_models  # noqa: E402
from benchmarks.models import (  # noqa: E402
    RESULTS_DIR,
    machine_info,
    ort_accuracy,
    write_json_atomic,
)
from tailor.api import run_pipeline  # noqa: E402
from tailor.ir import Model, run_model  # noqa: E402

__all__ = ["PIPELINES", "main", "measure"]

logger = logging.getLogger(__name__)

#: The settings compared: each runs with bias_correction=false and =true.
PIPELINES = (
    "fuse,quantize(mode=int8)",
    "fuse,quantize(mode=int8,per_channel=false)",
    "fuse,svd(rank=0.25)",
    "fuse,tucker2(rank=0.25)",
)
_ERROR_SAMPLES = 1000


def _with_bias(pipeline: str, on: bool) -> str:
    head, last = pipeline.rsplit(",", 1)
    return f"{head},{last[:-1]},bias_correction={'true' if on else 'false'})"


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def measure(
    model: Model, calib: dict[str, np.ndarray], held_out: dict[str, np.ndarray], pipeline: str
) -> dict[str, Any]:
    """Runs `pipeline` with bias correction off and on; logits error on `held_out`."""
    reference = next(iter(run_model(model, held_out).values()))
    row: dict[str, Any] = {}
    for on in (False, True):
        text = _with_bias(pipeline, on)
        start = time.perf_counter()
        out = run_pipeline(model, text, calibration=calib).model
        seconds = time.perf_counter() - start
        got = next(iter(run_model(out, held_out).values()))
        key = "on" if on else "off"
        row[key] = {"logits_rel_error": _rel(reference, got), "seconds": seconds, "model": out}
    return row


def _trained(names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        cached = bench_models.ensure_model(name)
        data = cached.load_data()
        model = Model.load(cached.onnx_path)
        input_name = model.inputs[0].name
        calib = {input_name: data["calib_x"]}
        held_out = {input_name: data["test_x"][:_ERROR_SAMPLES]}
        for pipeline in PIPELINES:
            row = measure(model, calib, held_out, pipeline)
            for key in ("off", "on"):
                out = row[key].pop("model")
                row[key]["accuracy"] = ort_accuracy(out.to_proto(), data["test_x"], data["test_y"])
            rows.append({"model": name, "pipeline": pipeline, **row})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _architectures() -> list[dict[str, Any]]:
    import tempfile

    from tests import architectures as arch

    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in arch.ARCHITECTURES:
            model = Model.load(arch.export(name, Path(tmp) / f"{name}.onnx"))
            calib = {"input": rng.standard_normal((32, 3, 32, 32)).astype(np.float32)}
            held_out = {"input": rng.standard_normal((64, 3, 32, 32)).astype(np.float32)}
            for pipeline in PIPELINES[:2]:
                row = measure(model, calib, held_out, pipeline)
                for key in ("off", "on"):
                    row[key].pop("model")
                rows.append({"model": f"arch:{name}", "pipeline": pipeline, **row})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line entry: measures and merges the rows under `--label`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="name of the implementation measured")
    parser.add_argument("--models", default=",".join(bench_models.SPECS))
    parser.add_argument("--architectures", action="store_true")
    parser.add_argument("--save", type=Path, default=RESULTS_DIR / "bias_correction.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = _trained([n for n in args.models.split(",") if n])
    if args.architectures:
        rows += _architectures()
    merged = json.loads(args.save.read_text()) if args.save.is_file() else {"runs": {}}
    merged["runs"][args.label] = {
        "machine": machine_info(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rows": rows,
    }
    write_json_atomic(args.save, merged)
    print(f"wrote {args.save}")


if __name__ == "__main__":
    main()
