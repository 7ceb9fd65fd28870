"""Replaces claims about the scheduler with measurements: runs `tailor.compress` on the
real trained models of benchmarks/models.py (host target, a 1-point accuracy budget) and
measures the chosen plan beside the baseline, onnxruntime's `quantize_static`, uniform
channel pruning at the plan's MACs, and every uniform single technique, in one run.

A benchmark script, never imported by tailor (needs `pip install -e .[bench]` and the
offline datasets of benchmarks/data.py). Run from the repository root::

    python -m benchmarks.compress [--models resnet,vgg,hapt,resnet18] [--quick]
                                  [--max-evaluations 240] [--max-seconds S]
                                  [--r18-max-seconds 420] [--strategy greedy]

Protocol, per trained model:

- **data**: the test set is split in two halves with a fixed seed. The *search half* is
  given to `compress` as `labels` (which splits it again into its own search and verify
  parts); the *report half* is never seen by the search, and every row's reported
  accuracy is measured on it. Calibration for every pass and for the peer: `calib_x`
  (512 training inputs).
- **rows**: the baseline (the trained model as exported); the plan; the peer
  (`onnxruntime.quantization.quantize_static`, QDQ, per-channel, MinMax); uniform
  `prune_channels(criterion=refit)` on every layer at the ratio, found by bisection,
  whose MACs match the plan's; and each uniform single technique (`fuse,` then one pass
  on every layer it applies to).
- **metrics**: held-out top-1 accuracy; storage as exact file bytes; MACs by
  `tailor.cost_models.macs` (a quantized layer counts as the float one); onnxruntime CPU
  latency (batch 1, one thread, interleaved over all rows of the model); energy as that
  latency times the host target's active-minus-idle power (tailor's power model).
- **objective**: `tailor.demands.Normalizer` over all measured rows of the model, with
  the demands' weights; a row meets the budget when its held-out accuracy is within the
  budget of the baseline's. The plan *beats* a row when its objective is lower.

The ResNet-18-sized timing (`resnet18` in `--models`): torchvision's ResNet-18 layout
(11.2 M parameters; ImageNet stem by default, `--r18-stem cifar` for the 3x3 stem) at
3x32x32 with random weights, compressed with fidelity scoring (calibration only, no
labels) under `--r18-max-seconds`; its wall time is what is recorded
(`resnet18-nolimit`: the same with no budget, the search's own end).

`--trace` writes every evaluation of a trained model's search to
`compress/NAME/trace.json` (what it changed, whether a uniform plan, its metrics).
`--suffix S` keeps a trained model's run with other settings (a larger budget, another
strategy) as `NAME@S`, beside the default run. `benchmarks/compress_report.py` renders
the Markdown.

Results are merged into `benchmarks/results/compress.json` (a run replaces the rows of
the models it ran) and rendered to `compress.md`; each model's `report.md`, `pareto.png`
and `plan.yaml` from `compress` are kept under `benchmarks/results/compress/<model>/`.
"""

from __future__ import annotations

import os

# One BLAS thread (see benchmarks/passes.py): set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import models as bench_models  # noqa: E402
from benchmarks.compress_report import render_markdown  # noqa: E402
from benchmarks.models import RESULTS_DIR, machine_info, ort_accuracy, write_json_atomic  # noqa: E402
from benchmarks.passes import PEERS, _ort_peer, interleaved_latency  # noqa: E402
from tailor import __version__ as tailor_version  # noqa: E402
from tailor.api import load, run_pipeline  # noqa: E402
from tailor.compress import CompressResult, compress, confirmation_summary  # noqa: E402
from tailor.cost_models.base import Estimate  # noqa: E402
from tailor.cost_models.energy import power_model_energy  # noqa: E402
from tailor.cost_models.macs import model_macs  # noqa: E402
from tailor.demands import Demands, Normalizer  # noqa: E402
from tailor.evaluate import split_samples  # noqa: E402
from tailor.search.greedy import _uniform_plans  # noqa: E402
from tailor.space import build_space  # noqa: E402
from tailor.targets import get_target  # noqa: E402

__all__ = ["SINGLES", "SPLIT_SEED", "uniform_prune_at_macs", "score_rows", "main"]

logger = logging.getLogger(__name__)

#: The seed of the search-half / report-half split of each test set.
SPLIT_SEED = 20261123
#: Uniform single techniques: one pass on every layer it applies to (after `fuse`).
SINGLES = (
    "quantize(mode=int8)",
    "prune_channels(ratio=0.125,criterion=refit)",
    "prune_channels(ratio=0.25,criterion=refit)",
    "prune_channels(ratio=0.375,criterion=refit)",
    "prune_channels(ratio=0.5,criterion=refit)",
    "prune_channels(ratio=0.625,criterion=refit)",
    "prune_channels(ratio=0.75,criterion=refit)",
    "tucker2(rank=0.5)",
    "tucker2(rank=0.25)",
    "svd(rank=0.5)",
    "quantize_weights(bits=4)",
    "cluster_weights(clusters=16)",
)
_PLAN_FILES = ("report.md", "pareto.png", "plan.yaml")
#: The ResNet-18-sized timing runs: within `--r18-max-seconds`, and with no budget.
_R18 = ("resnet18", "resnet18-nolimit")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _macs(model_bytes: bytes) -> tuple[float, float]:
    figures = model_macs(load(model_bytes))
    return figures["macs"].value, figures["params"].value


def _energy(latency_ms: float) -> float:
    """mJ per inference by the host target's power model (active minus idle power)."""
    latency = Estimate(latency_ms, "ms", "measured", "interleaved onnxruntime median")
    return power_model_energy(latency, get_target("host")).value


def uniform_prune_at_macs(
    source: Path, target_macs: float, calibration: dict[str, np.ndarray], *, steps: int = 9
) -> tuple[bytes, float, str]:
    """Uniform refit channel pruning whose MACs match `target_macs` as closely as the
    channel counts allow: (model bytes, ratio, pipeline).

    MACs depend only on how many channels go, not which, so the bisection uses the cheap
    l1 ranking without re-fit; the chosen ratio is then built with `criterion=refit`.
    """
    fused = run_pipeline(source, "fuse", check="basic").model.to_bytes()
    base_macs = _macs(fused)[0]
    if target_macs >= base_macs * 0.999:
        return fused, 0.0, "fuse"
    lo, hi, best = 0.0, 0.95, (float("inf"), 0.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        pruned = run_pipeline(
            fused, f"prune_channels(ratio={mid:.4f},reconstruct=false)", check="basic"
        ).model.to_bytes()
        macs = _macs(pruned)[0]
        best = min(best, (abs(macs - target_macs), mid))
        lo, hi = (mid, hi) if macs > target_macs else (lo, mid)
    ratio = round(best[1], 4)
    pipeline = f"fuse,prune_channels(ratio={ratio},criterion=refit)"
    result = run_pipeline(source, pipeline, calibration=calibration)
    return result.model.to_bytes(), ratio, pipeline


def _build_rows(
    cached: bench_models.CachedModel,
    data: dict[str, np.ndarray],
    result: CompressResult,
    seed: int,
) -> list[tuple[dict[str, Any], bytes | None]]:
    """(row, model bytes) of every comparison row; a failed build is an error row."""
    input_name = load(cached.onnx_path.read_bytes()).inputs[0].name
    calibration = {input_name: data["calib_x"]}
    plan_bytes = result.model.to_bytes()
    out: list[tuple[dict[str, Any], bytes | None]] = [
        ({"row": "baseline", "kind": "baseline", "pipeline": ""}, cached.onnx_path.read_bytes()),
        ({"row": "plan", "kind": "plan", "pipeline": result.plan.pipeline}, plan_bytes),
    ]

    def attempt(row: dict[str, Any], build: Any) -> None:
        start = time.perf_counter()
        try:
            model_bytes = build(row)
            row["build_seconds"] = round(time.perf_counter() - start, 2)
            out.append((row, model_bytes))
        except Exception as e:  # one failing row is data, not the end of the benchmark
            logger.debug("%s failed:\n%s", row["row"], traceback.format_exc())
            row.update(status="error", error=_first_line(e))
            out.append((row, None))
        print(f"  {row['row']}: {row.get('error', 'built')} [{time.perf_counter() - start:.1f} s]")

    def peer(row: dict[str, Any]) -> bytes:
        model_bytes, row["pipeline"] = _ort_peer(
            PEERS[0], cached.onnx_path, data["calib_x"], input_name
        )
        return model_bytes

    def same_macs(row: dict[str, Any]) -> bytes:
        target = _macs(plan_bytes)[0]
        model_bytes, row["ratio"], row["pipeline"] = uniform_prune_at_macs(
            cached.onnx_path, target, calibration
        )
        row["target_macs"] = target
        return model_bytes

    attempt({"row": "peer: ort quantize_static", "kind": "peer"}, peer)
    attempt(
        {"row": "uniform prune_channels(refit) at the plan's MACs", "kind": "same-macs"}, same_macs
    )
    for text in SINGLES:

        def single(row: dict[str, Any], text: str = text) -> bytes:
            row["pipeline"] = f"fuse,{text}"
            return run_pipeline(
                cached.onnx_path, row["pipeline"], calibration=calibration, seed=seed
            ).model.to_bytes()

        attempt({"row": f"uniform {text}", "kind": "single"}, single)
    return out


def score_rows(rows: list[dict[str, Any]], demands: Demands) -> None:
    """Adds `objective`, `meets_budget` and `violations` to the measured rows of a model."""
    ok = [r for r in rows if r.get("status") == "ok"]
    base = next((r for r in ok if r["kind"] == "baseline"), None)
    if base is None:
        return
    figures = [
        {"accuracy": r["accuracy"], "latency": r["latency_ms"]["median"],
         "energy": r["energy_mj"], "storage": r["storage_bytes"]}
        for r in ok
    ]  # fmt: skip
    norm = Normalizer.over(figures)
    for r, f in zip(ok, figures, strict=True):
        r["objective"] = norm.objective(f, demands.weights)
        r["violations"] = demands.violations(f, base["accuracy"])
        r["meets_budget"] = not r["violations"]
        if "accuracy_search_half" in r and "accuracy_search_half" in base:
            # What a user choosing one technique on the data compress had would see.
            r["meets_budget_search_half"] = not demands.violations(
                {"accuracy": r["accuracy_search_half"]}, base["accuracy_search_half"]
            )


def _progress(name: str) -> Any:
    state = {"last": 0.0, "phase": ""}

    def report(message: str, done: int, total: int | None) -> None:
        now = time.perf_counter()
        phase = message.split(":")[0]
        if now - state["last"] > 30 or phase != state["phase"]:
            state["last"], state["phase"] = now, phase
            print(f"  [{name}] {done}/{total or '?'} {message}", flush=True)

    return report


def _keep_plan_files(out_dir: Path, results_dir: Path, name: str) -> list[str]:
    dest = results_dir / "compress" / name
    dest.mkdir(parents=True, exist_ok=True)
    kept = []
    for file in _PLAN_FILES:
        if (out_dir / file).is_file():
            shutil.copyfile(out_dir / file, dest / file)
            kept.append(str((dest / file).relative_to(results_dir)))
    return kept


def _write_trace(result: CompressResult, model_path: Path, results_dir: Path, key: str) -> str:
    """Every evaluation of the search, in order (`--trace`): what it changed (the non-keep
    options by unit), whether it was a uniform plan, its metrics; for reading a search's
    path (which uniform plans broke the budget, what was repaired, which steps failed)."""
    _, units = _fused_space(model_path)
    uniform: dict[tuple[int, ...], str] = {}
    for a in _uniform_plans(units):
        i = next(k for k, c in enumerate(a) if c)
        uniform[tuple(a)] = units[i].options[a[i]].label
    keys = ("accuracy", "accuracy_measured", "accuracy_se", "latency", "storage", "macs")
    entries = []
    for n, (a, ev) in enumerate(result.search.history):
        a = tuple(a)
        entries.append(
            {
                "n": n,
                "assignment": list(a),
                "uniform": uniform.get(a),
                "changed": {units[i].name: units[i].options[j].label for i, j in enumerate(a) if j},
                "metrics": None if ev.metrics is None else {k: ev.metrics[k] for k in keys if k in ev.metrics},
                "error": ev.error,
            }
        )  # fmt: skip
    path = results_dir / "compress" / key / "trace.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"chosen": list(result.chosen), "evaluations": entries})
    return str(path.relative_to(results_dir))


#: What compress.json keeps of each confirmation check.
_CHECK_KEYS = ("rank", "backed_off", "change_held_out", "se_held_out", "confidence", "sure")


def _search_info(result: CompressResult, wall: float, budget: dict[str, Any]) -> dict[str, Any]:
    search = result.search
    info = result.plan.metrics["search"]
    limit = budget.get("max_seconds")
    stopped_by_budget = (budget.get("max_evaluations") is not None
                         and search.evaluations >= budget["max_evaluations"]) or (
        limit is not None and search.seconds >= 0.97 * limit)  # fmt: skip
    return {
        "budget": budget,
        "compress_wall_seconds": round(wall, 1),
        "search_seconds": round(search.seconds, 1),
        "evaluations": search.evaluations,
        "failed_evaluations": sum(1 for _, ev in search.history if ev.metrics is None),
        "options_alone": sum(1 for a, _ in search.history if sum(c != 0 for c in a) == 1),
        "options_alone_seconds": round(
            sum(ev.seconds for a, ev in search.history if sum(c != 0 for c in a) == 1), 1
        ),
        "stopped_by_budget": bool(stopped_by_budget),
        "feasible_in_search": search.feasible,
        "unmet_held_out": list(result.plan.unmet),
        "changed_layers": {
            lp.layer: [s.text() for s in lp.steps] for lp in result.plan.changed_layers()
        },  # fmt: skip
        "evaluation": result.plan.metrics.get("evaluation", ""),
        "compress_baseline": result.baseline,
        "compress_result": result.result,
        "confirmation": confirmation_summary(
            info.get("confirmation") or [],
            result.chosen,
            info.get("confidence", 0.5),
            info.get("test_samples", 0),
        ),
        "confirmation_checks": [
            {k: c[k] for k in _CHECK_KEYS if k in c} for c in info.get("confirmation") or []
        ],
    }


def _git_commit() -> str:
    """The checkout's commit, `+dirty` with uncommitted changes: tailor changes fast, and
    a number is only comparable with numbers from the same code."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(  # results the benchmark itself writes do not count
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!benchmarks/results",
            ],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def _fused_space(model_path: Path) -> tuple[Any, list[Any]]:
    """The model fused with shapes inferred, and the units compress searches over."""
    fused = run_pipeline(model_path, "fuse", check="basic").model
    fused.infer_shapes()
    return fused, build_space(fused)


def _space_info(model_path: Path) -> dict[str, Any]:
    fused, units = _fused_space(model_path)
    figures = model_macs(fused)
    return {
        "git_commit": _git_commit(),
        "macs": figures["macs"].value,
        "params": figures["params"].value,
        "units": len(units),
        "options": sum(len(u.options) - 1 for u in units),
    }


def run_trained(name: str, args: argparse.Namespace, demands: Demands, key: str) -> dict[str, Any]:
    """Compresses one trained model and measures every comparison row; results go under
    `key` (the name, or `name@suffix` for a run with other settings)."""
    cached = bench_models.ensure_model(name, cache=args.cache_dir)
    data = cached.load_data()
    search_idx, report_idx = split_samples((data["test_y"],), 0.5, SPLIT_SEED)
    labels = (data["test_x"][search_idx], data["test_y"][search_idx])
    rx, ry = data["test_x"][report_idx], data["test_y"][report_idx]
    input_name = load(cached.onnx_path.read_bytes()).inputs[0].name
    info = {"architecture": cached.meta["spec"]["architecture"], "dataset": cached.meta["dataset"],
            "model_sha256": cached.meta["onnx_sha256"],
            "search_samples": len(search_idx), "report_samples": len(report_idx),
            **_space_info(cached.onnx_path)}  # fmt: skip
    budget = {"max_evaluations": args.max_evaluations, "max_seconds": args.max_seconds}
    print(f"[{key}] compress: {info['units']} units, {info['options']} options, {budget}")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix=f"tailor-compress-{name}-") as tmp:
        start = time.perf_counter()
        result = compress(
            cached.onnx_path,
            calibration={input_name: data["calib_x"]},
            target="host",
            demands=demands,
            labels=labels,
            strategy=args.strategy,
            seed=args.seed,
            output_dir=tmp,
            resume=False,
            progress=_progress(key),
            workers=args.workers,
            **budget,
        )
        wall = time.perf_counter() - start
        info["files"] = _keep_plan_files(Path(tmp), args.results_dir, key)
        if args.trace:
            info["files"].append(_write_trace(result, cached.onnx_path, args.results_dir, key))
    info["search"] = _search_info(result, wall, budget) | {
        "workers": args.workers,
        "load_average_before": [round(x, 2) for x in load_start],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"[{name}] plan in {wall:.0f} s: {result.plan.pipeline}", flush=True)
    built = _build_rows(cached, data, result, args.seed)
    timed = {}
    for row, model_bytes in built:
        if model_bytes is None:
            continue
        try:
            row["accuracy"] = ort_accuracy(model_bytes, rx, ry, threads=args.eval_threads)
            row["accuracy_search_half"] = ort_accuracy(
                model_bytes, *labels, threads=args.eval_threads
            )
            row["storage_bytes"] = len(model_bytes)
            row["macs"], row["params"] = _macs(model_bytes)
            row.setdefault("status", "ok")
            timed[row["row"]] = model_bytes
        except Exception as e:
            row.update(status="error", error=_first_line(e))
    print(f"[{name}] latency of {len(timed)} models, {args.runs} runs each, interleaved")
    stats = interleaved_latency(
        timed, rx[:1], runs=args.runs, warmup=args.warmup, threads=args.latency_threads
    )
    for row, _ in built:
        if row["row"] in stats:
            row["latency_ms"] = stats[row["row"]]
            row["energy_mj"] = _energy(stats[row["row"]]["median"])
    rows = [dict(row, model=key) for row, _ in built]
    score_rows(rows, demands)
    for r in rows:
        if r.get("status") == "ok":
            print(f"  {r['row']}: acc {r['accuracy']:.4f} lat {r['latency_ms']['median']:.3f} ms "
                  f"{r['storage_bytes'] / 1024:.0f} KiB obj {r['objective']:.3f}"
                  f"{'' if r['meets_budget'] else ' (breaks budget)'}")  # fmt: skip
    return {"info": info, "rows": rows}


def _resnet18_onnx(path: Path, stem: str, seed: int) -> None:
    """torchvision's ResNet-18 layout (10 classes) at 3x32x32, random weights and random
    BatchNorm statistics (so folding them is not a no-op), exported like the models."""
    import torch
    from torch import nn

    from tests.architectures import randomize_batchnorm

    def cbn(cin: int, cout: int, k: int, s: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(*cbn(cin, cout, 3, stride), nn.ReLU(), *cbn(cout, cout, 3, 1))
            self.short = (
                nn.Sequential(*cbn(cin, cout, 1, stride)) if stride > 1 or cin != cout else None
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + (x if self.short is None else self.short(x)))

    torch.manual_seed(seed)
    head = [*cbn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)] if stem == "imagenet" else [
        *cbn(3, 64, 3, 1), nn.ReLU()]  # fmt: skip
    blocks = []
    for cin, cout, stride in ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)):
        blocks += [Block(cin, cout, stride), Block(cout, cout, 1)]
    model = nn.Sequential(*head, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))
    randomize_batchnorm(model)
    proto = bench_models._export(model.eval(), torch.randn(1, 3, 32, 32), {"model": "resnet18"})
    path.write_bytes(proto.SerializeToString())


def run_resnet18(args: argparse.Namespace, demands: Demands, name: str) -> dict[str, Any]:
    """The ResNet-18-sized timing: fidelity scoring, calibration only. `resnet18-nolimit`
    runs the search to its own end, with no time or evaluation budget."""
    rng = np.random.default_rng(args.seed)
    calib = rng.standard_normal((args.r18_calib, 3, 32, 32)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="tailor-compress-resnet18-") as tmp:
        src = Path(tmp) / "resnet18.onnx"
        _resnet18_onnx(src, args.r18_stem, args.seed)
        info = {"architecture": f"ResNet-18 ({args.r18_stem} stem), random weights, 3x32x32",
                "dataset": f"{args.r18_calib} standard-normal calibration inputs, fidelity",
                **_space_info(src)}  # fmt: skip
        budget = {"max_evaluations": args.r18_max_evaluations, "max_seconds": args.r18_max_seconds}
        if name.endswith("nolimit"):
            budget = {"max_evaluations": None, "max_seconds": None}
        print(f"[{name}] compress: {info['units']} units, {info['options']} options, {budget}")
        load_start = os.getloadavg()
        start = time.perf_counter()
        result = compress(
            src,
            calibration={"input": calib},
            target="host",
            demands=demands,
            strategy=args.strategy,
            seed=args.seed,
            output_dir=Path(tmp) / "out",
            resume=False,
            progress=_progress(name),
            workers=args.workers,
            **budget,
        )
        wall = time.perf_counter() - start
        info["files"] = _keep_plan_files(Path(tmp) / "out", args.results_dir, name)
        info["search"] = _search_info(result, wall, budget) | {
            "workers": args.workers,
            "load_average_before": [round(x, 2) for x in load_start],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
        timed = {"baseline": src.read_bytes(), "plan": result.model.to_bytes()}
    stats = interleaved_latency(
        timed, calib[:1], runs=args.r18_runs, warmup=5, threads=args.latency_threads
    )
    rows = []
    source = {"baseline": result.baseline, "plan": result.result}
    for key, model_bytes in timed.items():
        macs, params = _macs(model_bytes)
        rows.append({"model": name, "row": key, "kind": key, "status": "ok",
                     "pipeline": result.plan.pipeline if key == "plan" else "",
                     "storage_bytes": len(model_bytes), "macs": macs, "params": params,
                     "latency_ms": stats[key],
                     "energy_mj": _energy(stats[key]["median"]),
                     # Fidelity: top-1 agreement with the original on compress's
                     # held-out part of the calibration inputs.
                     "accuracy": source[key].get("accuracy_held_out")})  # fmt: skip
    print(f"[{name}] compress took {wall:.0f} s ({info['search']['evaluations']} evaluations)")
    return {"info": info, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark, merges into compress.json and renders compress.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,vgg,hapt,resnet18")
    parser.add_argument("--strategy", default="greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-accuracy-drop", default="1%")
    parser.add_argument("--weights", default="latency=0.5,storage=0.25,accuracy=0.25")
    parser.add_argument("--max-evaluations", type=int, default=240)
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--r18-max-seconds", type=float, default=420.0)
    parser.add_argument("--r18-max-evaluations", type=int, default=None)
    parser.add_argument("--r18-stem", choices=("imagenet", "cifar"), default="imagenet")
    parser.add_argument("--r18-calib", type=int, default=512)
    parser.add_argument("--r18-runs", type=int, default=100)
    parser.add_argument("--runs", type=int, default=300, help="timed latency runs per row")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--latency-threads", type=int, default=1)
    parser.add_argument("--eval-threads", type=int, default=2)
    parser.add_argument(
        "--workers", type=int, default=1, help="compress's candidate-building processes"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 24 evaluations, 60 s")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="also write every evaluation to compress/NAME/trace.json",
    )
    parser.add_argument(
        "--suffix",
        default="",
        help="keep the trained models' results as NAME@SUFFIX (a run with other settings, "
        "e.g. a larger budget), beside the default run's",
    )
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    for noisy in ("onnxruntime", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.quick:
        args.max_evaluations, args.r18_max_evaluations = 24, 24
        args.r18_max_seconds, args.runs = 120.0, 60
    demands = Demands.from_options(max_accuracy_drop=args.max_accuracy_drop, weights=args.weights)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in bench_models.SPECS and n not in _R18]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}")
    json_path = args.results_dir / "compress.json"
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    models = dict(previous.get("models", {}))
    keys = [n if n in _R18 or not args.suffix else f"{n}@{args.suffix}" for n in names]
    rows = [r for r in previous.get("rows", []) if r["model"] not in keys]
    date = datetime.now(UTC).isoformat(timespec="seconds")
    load_avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    order = [*bench_models.SPECS, *_R18]

    def rank(model: str) -> tuple[int, str]:
        base = model.split("@")[0]
        return (order.index(base) if base in order else len(order), model)

    for name, key in zip(names, keys, strict=True):
        try:
            done = run_resnet18(args, demands, name) if name in _R18 else run_trained(
                name, args, demands, key)  # fmt: skip
        except Exception as e:  # a failing compress is a result to report, not a crash
            traceback.print_exc()
            done = {"info": {"error": _first_line(e), "traceback": traceback.format_exc()},
                    "rows": []}  # fmt: skip
        models[key] = done["info"] | {"date": date, "quick": args.quick, "seed": args.seed}
        rows += done["rows"]
        payload = {
            "meta": {
                "date": date,
                "tailor": tailor_version,
                "machine": machine_info(),
                "load_average": load_avg,
                "demands": demands.as_dict(),
                "strategy": args.strategy,
                "seed": args.seed,
                "split_seed": SPLIT_SEED,
                "runs": args.runs,
                "warmup": args.warmup,
                "latency_threads": args.latency_threads,
                "host_power_w": {
                    k: getattr(get_target("host"), k) for k in ("power_active_w", "power_idle_w")
                },  # fmt: skip
            },
            "model_order": sorted(models, key=rank),
            "models": models,
            "rows": sorted(rows, key=lambda r: rank(r["model"])),
        }
        # Written after every model, so a long run that dies keeps what it measured.
        write_json_atomic(json_path, payload)
        text = render_markdown(payload)
        bench_models._write_atomic(
            args.results_dir / "compress.md", lambda f, t=text: f.write(t.encode())
        )
    print(f"wrote {json_path} and {args.results_dir / 'compress.md'}")


if __name__ == "__main__":
    main()
