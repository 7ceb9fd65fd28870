"""`tailor cost`: what a model costs on a target, per layer and in total, each figure
with its source (a thin layer over :func:`tailor.costing.model_cost`)."""

from __future__ import annotations

import json

import click

__all__ = ["cost_cmd"]

_COLUMNS = (
    ("latency_ms", "latency ms", "{:.4f}"),
    ("energy_mj", "energy mJ", "{:.5f}"),
    ("storage_bytes", "weights B", "{:,.0f}"),
    ("macs", "MACs", "{:,.0f}"),
)
_TOTALS = (
    ("latency_ms", "latency", "{:.4f} ms"),
    ("energy_mj", "energy", "{:.5f} mJ"),
    ("storage_bytes", "storage", "{:,.0f} B"),
    ("macs", "MACs", "{:,.0f}"),
    ("params", "params", "{:,.0f}"),
    ("peak_memory_bytes", "peak memory", "{:,.0f} B"),
    ("weights_bytes", "  weights", "{:,.0f} B"),
    ("activations_peak_bytes", "  activations at peak", "{:,.0f} B"),
)


@click.command(name="cost")
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
    "--latency",
    "latency_source",
    type=click.Choice(["auto", "measured", "tvm-tuned", "learned", "roofline"]),
    default="auto",
    show_default=True,
    help="Where latency comes from; auto measures the host, else a trained predictor, else roofline.",
)
@click.option(
    "--no-measure", is_flag=True, help="With auto, predict even where measuring is possible."
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="onnxruntime intra-op threads.",
)
@click.option(
    "--runs",
    type=click.IntRange(min=2),
    default=100,
    show_default=True,
    help="Timed runs when measuring.",
)
@click.option(
    "--rpc", metavar="HOST:PORT", help="Measure a TVM module on devices behind this RPC tracker."
)
@click.option("--key", metavar="NAME", help="The devices' key at the tracker (with --rpc).")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Root of tailor's caches [default: ~/.cache/tailor].",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def cost_cmd(
    model: str,
    target_name: str,
    latency_source: str,
    no_measure: bool,
    threads: int,
    runs: int,
    rpc: str | None,
    key: str | None,
    cache_dir: str | None,
    as_json: bool,
) -> None:
    """Print MODEL's per-layer and total latency, energy, storage, MACs and peak memory
    on a target, each with where it comes from (measured, tvm-tuned, learned, roofline,
    analytic, power-model, exact)."""
    from tailor.costing import model_cost
    from tailor.errors import TailorError

    if bool(rpc) != bool(key):
        raise TailorError("--rpc HOST:PORT and --key NAME go together")
    cost = model_cost(
        model,
        target_name,
        latency_source=latency_source,
        measure=not no_measure,
        threads=threads,
        runs=runs,
        cache_dir=cache_dir,
        rpc=rpc,
        key=key,
    )
    if as_json:
        click.echo(json.dumps(cost.as_dict(), indent=2))
        return
    header = ["#", "layer", "op"] + [label for _, label, _ in _COLUMNS]
    rows = []
    for i, layer in enumerate(cost.layers):
        cells = [str(i), layer.name, layer.op]
        for key_, _, spec in _COLUMNS:
            est = layer.metrics.get(key_)
            cells.append("-" if est is None else spec.format(est.value))
        rows.append(cells)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    right = set(range(3, len(header)))
    for r in [header, ["-" * w for w in widths], *rows]:
        click.echo(
            "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
    sources = sorted({e.source for layer in cost.layers for e in layer.metrics.values()})
    click.echo(f"\nper-layer sources: {', '.join(sources)}")
    click.echo(f"total on {cost.target}:")
    for key_, label, spec in _TOTALS:
        est = cost.total.get(key_)
        if est is None:
            continue
        note = f"  ({est.note})" if est.note and key_ in ("latency_ms", "energy_mj") else ""
        click.echo(f"  {label:<22} {spec.format(est.value):>16}  [{est.source}]{note}")
