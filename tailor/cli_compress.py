"""`tailor compress`: the scheduler from the command line (a thin layer over
:func:`tailor.compress.compress`)."""

from __future__ import annotations

import logging
import sys

import click

__all__ = ["compress_cmd"]

logger = logging.getLogger(__name__)


class _Progress:
    """One status line on stderr, redrawn in place on a terminal, a line per step otherwise."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, message: str, done: int, total: int | None) -> None:
        if self.quiet:
            return
        of = f"/{total}" if total else ""
        line = f"[{done}{of}] {message}"
        if self.tty:
            click.echo(f"\r{line[:118]:<118}", err=True, nl=False)
        elif line != self.last:
            click.echo(line, err=True)
        self.last = line

    def close(self) -> None:
        if self.tty and self.last and not self.quiet:
            click.echo("", err=True)


@click.command(name="compress")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "-t",
    "--target",
    "target_name",
    default="host",
    show_default=True,
    help="Target name, or FILE.yaml[:NAME].",
)
@click.option(
    "--data",
    required=True,
    metavar="FILE.npz[:ARRAY]",
    help="Calibration inputs for the data-driven passes.",
)
@click.option(
    "--labels",
    metavar="FILE.npz[:X,Y]",
    help="Held-out inputs and labels: accuracy is searched on half, verified on the other.",
)
@click.option(
    "--eval",
    "eval_spec",
    metavar="MODULE:FUNCTION",
    help="Your evaluator: FUNCTION(onnx_path) -> float, higher is better.",
)
@click.option(
    "--demands",
    "demands_file",
    type=click.Path(dir_okay=False),
    help="Demands YAML (budgets, weights, usage).",
)
@click.option("--max-accuracy-drop", metavar="1%|0.01|2%rel", help="Accuracy budget [default: 1%].")
@click.option("--max-latency", metavar="20ms", help="Latency budget per inference.")
@click.option("--max-energy", metavar="5mJ", help="Energy budget per inference.")
@click.option("--max-storage", metavar="4MB", help="Model file budget.")
@click.option(
    "--max-peak-memory", metavar="16MB", help="Peak memory budget (weights + live activations)."
)
@click.option(
    "--weights",
    metavar="latency=0.5,...",
    help="Objective weights over accuracy, latency, energy, storage.",
)
@click.option(
    "--battery-mah", type=click.FloatRange(min=0), help="Derive weights from the battery (AdaDeep)."
)
@click.option(
    "--cache-mb",
    type=click.FloatRange(min=0),
    help="Derive the storage weight from the cache size.",
)
@click.option(
    "--strategy",
    type=click.Choice(["greedy", "evolutionary", "rl"]),
    default="greedy",
    show_default=True,
)
@click.option(
    "--max-evaluations",
    type=click.IntRange(min=1),
    help="Stop the search after this many candidates.",
)
@click.option(
    "--max-time",
    type=click.FloatRange(min=1),
    metavar="SECONDS",
    help="Stop the search after this long (loading, confirming and applying the plan come "
    "on top: confirming starts no new check after a quarter of this or a minute; about "
    "70 s more in all for a ResNet-18).",
)
@click.option(
    "--latency-source",
    type=click.Choice(["auto", "measured", "learned", "roofline"]),
    default="auto",
    show_default=True,
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes that build candidates in parallel (timing stays one at a time).",
)
@click.option(
    "--confirm",
    type=click.IntRange(min=0),
    default=12,
    show_default=True,
    metavar="N",
    help="Check up to N plans on the held-out labels (the search's best by objective, and "
    "back-offs of those that fall short there) and apply the first that keeps the accuracy "
    "budget there with --confidence (0: apply the search's best).",
)
@click.option(
    "--confidence",
    type=click.FloatRange(min=0.5, max=1, max_open=True),
    default=0.8,
    show_default=True,
    metavar="P",
    help="How sure the confirmation must be that a plan keeps the accuracy budget, from "
    "its held-out reading and that reading's standard error: that a fresh test set of "
    "--test-samples reads it within the budget (0.5: the reading itself must meet the "
    "budget).",
)
@click.option(
    "--test-samples",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="The size of the fresh test set --confidence is about (its own sampling error "
    "counts too) [default: as many as the labelled samples given; 0: the plan's true "
    "accuracy].",
)
@click.option(
    "--rpc", metavar="HOST:PORT", help="Measure candidates on boards behind this TVM RPC tracker."
)
@click.option("--key", metavar="NAME", help="The boards' key at the tracker (with --rpc).")
@click.option(
    "--fresh", is_flag=True, help="Ignore the saved search state in OUTDIR and start over."
)
@click.option(
    "-o",
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Where model.onnx, plan.yaml and report.md go.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def compress_cmd(
    model: str,
    target_name: str,
    data: str,
    labels: str | None,
    eval_spec: str | None,
    demands_file: str | None,
    max_accuracy_drop: str | None,
    max_latency: str | None,
    max_energy: str | None,
    max_storage: str | None,
    max_peak_memory: str | None,
    weights: str | None,
    battery_mah: float | None,
    cache_mb: float | None,
    strategy: str,
    max_evaluations: int | None,
    max_time: float | None,
    latency_source: str,
    seed: int,
    workers: int,
    confirm: int,
    confidence: float,
    test_samples: int | None,
    rpc: str | None,
    key: str | None,
    fresh: bool,
    output_dir: str,
    quiet: bool,
) -> None:
    """Choose per layer the passes that best meet your demands on a target, apply them,
    and write OUTDIR/model.onnx, OUTDIR/plan.yaml and OUTDIR/report.md.

    A killed run restarts where it stopped (OUTDIR/search-state.jsonl) unless --fresh.
    """
    from tailor.compress import compress, confirmation_summary
    from tailor.demands import Demands, load_demands
    from tailor.errors import TailorError

    if labels and eval_spec:
        raise TailorError("--labels and --eval are two ways to score a model: give one")
    base = load_demands(demands_file) if demands_file else None
    demands = Demands.from_options(
        max_accuracy_drop=max_accuracy_drop,
        max_latency=max_latency,
        max_energy=max_energy,
        max_storage=max_storage,
        max_peak_memory=max_peak_memory,
        weights=weights,
        battery_mah=battery_mah,
        cache_mb=cache_mb,
        base=base,
    )
    progress = _Progress(quiet)
    try:
        result = compress(
            model,
            calibration=data,
            target=target_name,
            demands=demands,
            labels=labels,
            evaluator=eval_spec,
            strategy=strategy,
            seed=seed,
            max_evaluations=max_evaluations,
            max_seconds=max_time,
            output_dir=output_dir,
            latency_source=latency_source,
            resume=not fresh,
            workers=workers,
            rpc=rpc,
            key=key,
            progress=progress,
            confirm=confirm,
            confidence=confidence,
            test_samples=test_samples,
        )
    finally:
        progress.close()
    plan, base_m, res_m = result.plan, result.baseline, result.result
    click.echo(
        f"plan: {len(plan.changed_layers())} of {len(plan.layers)} layers changed; pipeline: {plan.pipeline}"
    )
    for key, unit in (
        ("accuracy_held_out", ""),
        ("latency", " ms"),
        ("energy", " mJ"),
        ("storage", " B"),
    ):
        b, r = base_m.get(key), res_m.get(key)
        if b is not None and r is not None:
            click.echo(f"  {key}: {b:.4g}{unit} -> {r:.4g}{unit}")
    search = plan.metrics["search"]
    line = confirmation_summary(
        search.get("confirmation") or [],
        result.chosen,
        search.get("confidence", 0.5),
        search.get("test_samples", 0),
    )
    if line:
        click.echo(line)
    if plan.unmet:
        click.echo(f"budgets NOT met (closest plan found): {'; '.join(plan.unmet)}")
    else:
        click.echo("all budgets met on held-out data")
    for kind, path in result.files.items():
        click.echo(f"{kind}: {path}")
