"""The `tailor` command line: a thin click layer over :mod:`tailor.api`.

Exit codes: 0 success, 2 a user error (bad model, flag, pipeline, data; one line on
stderr, no traceback unless `--debug`), 1 a bug in tailor (with its traceback), 130
interrupted.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from tailor import __version__

__all__ = ["main", "cli"]

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


class _State:
    debug = False


def _shapes(values: Sequence[str]) -> dict[str, list[int]] | None:
    """`--input-shape` values as a dict; a nameless one applies to the only input."""
    from tailor.api import parse_input_shape

    out: dict[str, list[int]] = {}
    for text in values:
        name, dims = parse_input_shape(text)
        out[name or ""] = dims
    return out or None


def _resolve_shapes(model_path: str, shapes: dict[str, list[int]] | None):
    """Gives a nameless `--input-shape` the name of the model's only input."""
    if not shapes or "" not in shapes:
        return shapes
    from tailor.errors import TailorError
    from tailor.ir.model import Model

    model = Model.load(model_path)
    if len(model.inputs) != 1:
        names = ", ".join(t.name for t in model.inputs)
        raise TailorError(
            f"the model has {len(model.inputs)} inputs ({names}); write --input-shape NAME=D0,D1,..."
        )
    shapes[model.inputs[0].name] = shapes.pop("")
    return shapes


_input_shape_option = click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=D0,D1,...",
    help="Fix a symbolic input shape (repeatable; NAME may be left out for a one-input model).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="tailor")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(verbose: int, debug: bool) -> None:
    """tailor: tailors a trained ONNX model to a device and the way it is used."""
    _State.debug = debug
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt_shape(shape) -> str:
    return "?" if shape is None else "x".join(str(d) for d in shape)


def _table(rows: list[list[str]], header: list[str], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@_input_shape_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(model: str, input_shapes: tuple[str, ...], as_json: bool) -> None:
    """Show each weighted layer (op, shapes, params, MACs, bytes) and the totals.

    MACs and shapes are per sample (batch 1).
    """
    from tailor.api import inspect_model

    summary = inspect_model(model, input_shapes=_resolve_shapes(model, _shapes(input_shapes)))
    if as_json:
        click.echo(json.dumps({"model": model, **summary.as_dict()}, indent=2))
        return
    rows = [
        [
            str(layer.index),
            layer.name,
            layer.op
            + (" dw" if layer.is_depthwise else f" g{layer.groups}" if layer.groups > 1 else ""),
            _fmt_shape(layer.input_shape),
            _fmt_shape(layer.output_shape),
            _fmt_int(layer.params),
            _fmt_int(layer.macs),
            _fmt_int(layer.weight_bytes),
        ]
        for layer in summary.layers
    ]
    header = ["#", "layer", "op", "input", "output", "params", "MACs", "bytes"]
    click.echo(_table(rows, header, right={0, 5, 6, 7}))
    ops = ", ".join(f"{op} {n}" for op, n in sorted(summary.ops.items(), key=lambda kv: -kv[1]))
    click.echo(
        f"\n{len(summary.layers)} layers, {summary.nodes} nodes ({ops})\n"
        f"params {_fmt_int(summary.params)}, weights {_fmt_int(summary.weight_bytes)} bytes, "
        f"MACs {_fmt_int(summary.macs)} per sample"
    )


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-p", "--pipeline", required=True, help="Pipeline text, e.g. 'fuse'.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the .onnx.",
)
@click.option(
    "--data",
    metavar="FILE.npz[:ARRAY]",
    help="Calibration data: arrays named like the inputs, or ARRAY for a one-input model.",
)
@_input_shape_option
@click.option(
    "--check",
    type=click.Choice(["full", "basic", "none"]),
    default="full",
    show_default=True,
    help="Checks after each pass: full = ONNX full check + numeric check of lossless passes.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random choices.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the canonical pipeline.")
def run(
    model: str,
    pipeline: str,
    output: str,
    data: str | None,
    input_shapes: tuple[str, ...],
    check: str,
    seed: int,
    quiet: bool,
) -> None:
    """Run a pipeline of passes on MODEL and write the result to OUTPUT.

    Prints what each pass changed and the canonical pipeline text, which is also stored
    in the output's metadata (tailor.pipeline).
    """
    from tailor.api import run_pipeline
    from tailor.ir.model import Model
    from tailor.passes import PassManager

    PassManager.from_text(pipeline)  # a typo in the pipeline fails before any slow work

    def progress(name: str, i: int, total: int) -> None:
        if not quiet:
            click.echo(f"[{i + 1}/{total}] {name} ...", err=True)

    before = Model.load(model)
    result = run_pipeline(
        before,
        pipeline,
        output,
        calibration=data,
        input_shapes=_resolve_shapes(model, _shapes(input_shapes)),
        check=check,
        seed=seed,
        progress=progress,
    )
    if not quiet:
        for rec in result.records:
            state = f"{len(rec.changes)} change(s)" if rec.modified else "no change"
            click.echo(f"{rec.text}: {state} in {rec.seconds:.2f}s")
            for change in rec.changes:
                click.echo(f"  {change}")
            if rec.check:
                click.echo(f"  check: {rec.check}")
        size_in, size_out = Path(model).stat().st_size, Path(output).stat().st_size
        click.echo(
            f"nodes {len(before.nodes)} -> {len(result.model.nodes)}, "
            f"file {_fmt_int(size_in)} -> {_fmt_int(size_out)} bytes; wrote {output}"
        )
    click.echo(f"pipeline: {result.pipeline}")


@cli.command(name="apply")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the .onnx.",
)
@click.option(
    "--data",
    metavar="FILE.npz[:ARRAY]",
    help="Calibration data for the plan's data-driven passes (pruning re-fits, int8).",
)
@click.option(
    "--force", is_flag=True, help="Apply even if MODEL is not the model the plan was made for."
)
@click.option(
    "--check",
    type=click.Choice(["full", "basic", "none"]),
    default="full",
    show_default=True,
    help="Checks after each pass.",
)
def apply_cmd(
    model: str, plan: str, output: str, data: str | None, force: bool, check: str
) -> None:
    """Replay PLAN (from `tailor compress`, YAML or JSON) on MODEL exactly."""
    from tailor.api import apply_plan
    from tailor.plan import Plan

    loaded = Plan.load(plan)

    def progress(name: str, i: int, total: int) -> None:
        click.echo(f"[{i + 1}/{total}] {name} ...", err=True)

    result = apply_plan(
        model, loaded, output, calibration=data, force=force, check=check, progress=progress
    )
    changed = len(loaded.changed_layers())
    click.echo(f"applied {changed} layer change(s) of {len(loaded.layers)}; wrote {output}")
    click.echo(f"pipeline: {result.pipeline}")


@cli.command()
@click.argument("name", required=False)
def passes(name: str | None) -> None:
    """List the passes with their parameters (or describe one pass)."""
    from tailor.passes import available_passes, get_pass

    chosen = {name: get_pass(name)} if name else available_passes()
    for i, cls in enumerate(chosen.values()):
        if i:
            click.echo()
        kind = "lossless" if cls.lossless else "lossy"
        click.echo(f"{cls.name} ({kind}): {cls.summary()}")
        for param in cls.schema().values():
            click.echo(f"    {param.describe()}")
        if name:
            # the first paragraph is the summary printed above
            text = "\n\n".join((cls.__doc__ or "").strip().split("\n\n")[1:]).strip()
            if text:
                click.echo("\n" + "\n".join("  " + line.strip() for line in text.splitlines()))


_targets_file_option = click.option(
    "--targets-file",
    "targets_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Load user targets from a YAML file (repeatable).",
)


def _load_target_files(paths: Sequence[str]) -> None:
    from tailor.targets import load_targets

    for path in paths:
        load_targets(path)


@cli.command()
@click.argument("name", required=False)
@_targets_file_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def targets(name: str | None, targets_files: tuple[str, ...], as_json: bool) -> None:
    """List the device targets (or describe one, with the source of every figure).

    NAME may also be a YAML file defining one target, or FILE.yaml:NAME.
    """
    from tailor.targets import available_targets, get_target

    _load_target_files(targets_files)
    chosen = {name: get_target(name)} if name else available_targets()
    if as_json:
        click.echo(json.dumps([t.to_dict() for t in chosen.values()], indent=2))
        return
    if name:
        t = chosen[name]
        click.echo(f"{t.name}: {t.description}")
        if "description" in t.sources:
            click.echo(f"      source: {t.sources['description']}")
        for key, value in t.to_dict().items():
            if key in ("name", "description", "sources"):
                continue
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            click.echo(f"  {key}: {text}")
            for skey, source in t.sources.items():
                if skey == key or skey.startswith(f"{key}."):
                    label = skey.partition(".")[2] or "source"
                    click.echo(f"      {label}: {source}")
        return
    rows = [
        [
            t.name,
            t.kind,
            t.arch,
            str(t.cores),
            f"{t.peak('float32'):,.0f}",
            f"{t.mem_bandwidth_gbs:g}",
            f"{t.memory_mb:,}",
            f"{t.power_idle_w:g}/{t.power_active_w:g}",
            t.description,
        ]
        for t in chosen.values()
    ]
    header = [
        "name",
        "kind",
        "arch",
        "cores",
        "fp32 GFLOP/s",
        "GB/s",
        "memory MiB",
        "W idle/active",
    ]
    click.echo(_table(rows, [*header, "description"], right={3, 4, 5, 6, 7}))
    click.echo("\n`tailor targets NAME` shows every figure and its source.")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "-t", "--target", "target_name", required=True, help="Target name, or FILE.yaml[:NAME]."
)
@_targets_file_option
@click.option("--rpc", metavar="HOST:PORT", help="Measure on devices behind this TVM RPC tracker.")
@click.option("--key", metavar="NAME", help="The devices' key at the tracker (with --rpc).")
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Measured candidates per task (fused operator).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Root of the tuning databases [default: ~/.cache/tailor/tune].",
)
@_input_shape_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the tracker and for a free device.",
)
@click.option("--seed", type=int, default=None, help="Seed of the search (default: random).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Also write the tuned module (.so; .tar for the device to link).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def tune(
    model: str,
    target_name: str,
    targets_files: tuple[str, ...],
    rpc: str | None,
    key: str | None,
    trials: int,
    cache_dir: str | None,
    input_shapes: tuple[str, ...],
    timeout: float,
    seed: int | None,
    output: str | None,
    quiet: bool,
) -> None:
    """Tune MODEL's operators for a target with TVM MetaSchedule.

    Each task gets --trials measured candidates; records go to a database in the cache
    directory after every batch, so an interrupted run (Ctrl-C keeps the batch in flight)
    resumes where it stopped and a finished one is not measured again.
    """
    from tailor.errors import TailorError
    from tailor.ir.model import Model
    from tailor.targets import get_target
    from tailor.targets import tune as tuning
    from tailor.targets.tvm_build import export_module

    if bool(rpc) != bool(key):
        raise TailorError("--rpc HOST:PORT and --key NAME go together")
    _load_target_files(targets_files)
    target = get_target(target_name)
    shapes = _resolve_shapes(model, _shapes(input_shapes))
    loaded = Model.load(model)

    def progress(p: tuning.TuneProgress) -> None:
        if quiet:
            return
        best = (
            f"best {_fmt_us(p.task.best_us)} us" if p.task.best_us is not None else "no result yet"
        )
        click.echo(
            f"[{p.measured}/{p.planned}] task {p.task_index + 1}/{p.task_count} "
            f"{p.task.name}: {p.task.trials}/{p.budget} trials, {best}",
            err=True,
        )

    try:
        result = tuning.tune(
            loaded,
            target,
            trials=trials,
            rpc=rpc,
            key=key,
            cache_dir=cache_dir,
            input_shapes=shapes,
            timeout=timeout,
            seed=seed,
            progress=progress,
        )
    except tuning.TuneInterrupted as e:
        _print_tune_result(e.result)
        raise
    _print_tune_result(result)
    if output:
        built = tuning.build_tuned(loaded, target, cache_dir=cache_dir, input_shapes=shapes)
        click.echo(f"wrote {export_module(built, output)}")


def _fmt_us(us: float) -> str:
    return f"{us:,.1f}" if us >= 10 else f"{us:.3g}"


def _print_tune_result(result) -> None:
    rows = []
    for t in result.tasks:
        gflops = t.flops / t.best_us / 1e3 if t.best_us else None
        rows.append(
            [
                t.name,
                str(t.weight),
                f"{t.trials_before}->{t.trials}" if t.measured else str(t.trials),
                "-" if t.best_us is None else _fmt_us(t.best_us),
                "-" if gflops is None else f"{gflops:,.2f}",
            ]
        )
    header = ["task", "weight", "trials", "best us", "GFLOP/s"]
    click.echo(_table(rows, header, right={1, 2, 3, 4}))
    latency = result.latency_us
    state = "interrupted; " if result.interrupted else ""
    click.echo(
        f"\n{state}{result.measured} new measurement(s); "
        + (f"tuned tasks sum to {_fmt_us(latency)} us per run; " if latency is not None else "")
        + f"database {result.database_dir}"
    )
    for t in result.tasks:
        if t.error and t.best_us is None:
            click.echo(f"warning: no successful measurement of {t.name}: {t.error}", err=True)


def _register() -> None:
    from tailor.cli_compress import compress_cmd
    from tailor.cli_cost import cost_cmd

    cli.add_command(compress_cmd)
    cli.add_command(cost_cmd)


_register()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs the CLI, maps errors to one line and an exit code."""
    from tailor.errors import TailorError

    try:
        cli.main(
            args=list(argv) if argv is not None else None, prog_name="tailor", standalone_mode=False
        )
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("tailor: interrupted", err=True)
        return 130
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else e.format_message(), err=True)
        return EXIT_USER_ERROR
    except click.ClickException as e:
        # Usage errors on one line, without click's multi-line usage banner.
        click.echo(f"tailor: error: {e.format_message()}", err=True)
        return EXIT_USER_ERROR
    except TailorError as e:
        if _State.debug:
            raise
        click.echo(f"tailor: error: {e}", err=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        click.echo("tailor: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
