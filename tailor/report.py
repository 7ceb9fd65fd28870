"""The report of a `tailor compress` run: Markdown with PNG plots.

It shows the baseline and the result side by side (each figure with its source), which
budgets hold (on held-out data), the Pareto front of accuracy against latency, energy and
storage with the chosen plan marked, and per layer what was chosen and why: the option's
effect when applied alone (its sensitivity) as the search measured it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tailor.search.base import Unit

if TYPE_CHECKING:
    from tailor.compress import CompressResult

__all__ = ["write_report", "pareto_front"]

logger = logging.getLogger(__name__)

_ROWS = (
    ("accuracy_measured", "accuracy (search part)", "{:.4f}"),
    ("accuracy_se", "paired standard error of the change (search part)", "{:.4f}"),
    ("accuracy", "accuracy less that error (what the search ranks)", "{:.4f}"),
    ("accuracy_held_out", "accuracy (held out)", "{:.4f}"),
    ("accuracy_held_out_se", "paired standard error of the change (held out)", "{:.4f}"),
    ("latency", "latency ms", "{:.3f}"),
    ("energy", "energy mJ", "{:.4f}"),
    ("storage", "storage bytes", "{:,.0f}"),
    ("peak_memory", "peak memory bytes", "{:,.0f}"),
    ("macs", "MACs", "{:,.0f}"),
)
_AXES = (("latency", "latency (ms)"), ("energy", "energy (mJ)"), ("storage", "storage (bytes)"))


def pareto_front(points: Sequence[dict[str, float]], cost: str) -> list[int]:
    """Indices of the points no other point beats on both accuracy and `cost`."""
    front = []
    for i, p in enumerate(points):
        if p.get(cost) is None or p.get("accuracy") is None:
            continue
        dominated = any(
            q.get(cost) is not None
            and q.get("accuracy") is not None
            and q[cost] <= p[cost]
            and q["accuracy"] >= p["accuracy"]
            and (q[cost] < p[cost] or q["accuracy"] > p["accuracy"])
            for q in points
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][cost])


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    try:
        return spec.format(value)
    except (TypeError, ValueError):
        return str(value)


def _plot(points: list[dict[str, float]], chosen: dict, baseline: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        logger.warning("matplotlib is missing: the report has no plots")
        return None
    axes_used = [(k, label) for k, label in _AXES if any(p.get(k) is not None for p in points)]
    if not axes_used:
        return None
    fig, axes = plt.subplots(1, len(axes_used), figsize=(4.2 * len(axes_used), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], axes_used, strict=True):
        xs = [p[key] for p in points if p.get(key) is not None]
        ys = [p["accuracy"] for p in points if p.get(key) is not None]
        ax.scatter(xs, ys, s=10, c="#bbbbbb", label="evaluated")
        front = pareto_front(points, key)
        ax.plot([points[i][key] for i in front], [points[i]["accuracy"] for i in front],
                "-o", c="#1f77b4", ms=4, label="Pareto front")  # fmt: skip
        if baseline.get(key) is not None:
            ax.scatter(
                [baseline[key]], [baseline["accuracy"]], marker="x", c="k", s=50, label="baseline"
            )
        if chosen.get(key) is not None:
            ax.scatter(
                [chosen[key]], [chosen["accuracy"]], marker="*", c="#d62728", s=160, label="chosen"
            )
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (search part)")
        ax.grid(alpha=0.3)
        # Candidates far below the budget would flatten the interesting part of the plot.
        accs = [p["accuracy"] for p in points if p.get("accuracy") is not None]
        if accs and baseline.get("accuracy") is not None:
            low = max(min(accs), baseline["accuracy"] - 0.1)
            hidden = sum(a < low for a in accs)
            ax.set_ylim(low - 0.005, max(accs) + 0.005)
            if hidden:
                ax.set_title(f"{hidden} candidate(s) below {low:.3f} not shown", fontsize=7)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _alone(
    result: CompressResult, units: Sequence[Unit]
) -> dict[tuple[int, int], dict[str, float]]:
    """(unit, option) -> metrics of that option applied alone, from the search history."""
    found = {}
    for assignment, evaluation in result.search.history:
        if evaluation.metrics is None:
            continue
        changed = [i for i, c in enumerate(assignment) if c]
        if len(changed) == 1:
            i = changed[0]
            found[(i, assignment[i])] = evaluation.metrics
    return found


def write_report(result: CompressResult, units: Sequence[Unit], folder: Path) -> dict[str, Path]:
    """Writes `report.md` and `pareto.png` into `folder`; returns their paths."""
    from tailor.compress import confirmation_summary

    plan, search = result.plan, result.search
    base, res = result.baseline, result.result
    points = [e.metrics for _, e in search.history if e.metrics is not None]
    files: dict[str, Path] = {}
    png = _plot(
        points, plan.metrics.get("predicted") or search.metrics, base, folder / "pareto.png"
    )
    sources = plan.metrics.get("sources", {})
    lines = [
        f"# tailor report: {plan.model_name or 'model'} on {plan.target}",
        "",
        f"Strategy `{plan.strategy}` (seed {plan.seed}), {search.evaluations} candidate evaluations "
        f"in {plan.metrics['search']['seconds']:.1f} s. Score: {plan.metrics['evaluation']}.",
        "",
        f"Pipeline: `{plan.pipeline}`",
        "",
        "## Budgets",
        "",
    ]
    d = plan.demands
    budget_bits = []
    if d.get("max_accuracy_drop") is not None:
        kind = "relative" if d.get("relative_accuracy_drop") else "points"
        budget_bits.append(f"accuracy drop ≤ {100 * d['max_accuracy_drop']:.2f} % ({kind})")
    for key, label in (("max_latency_ms", "latency ≤ {} ms"), ("max_energy_mj", "energy ≤ {} mJ"),
                       ("max_storage_bytes", "storage ≤ {:,.0f} B"),
                       ("max_peak_memory_bytes", "peak memory ≤ {:,.0f} B")):  # fmt: skip
        if d.get(key) is not None:
            budget_bits.append(label.format(d[key]))
    weights = ", ".join(f"{k} {v:.2f}" for k, v in (d.get("weights") or {}).items() if v)
    lines.append(f"Demands: {'; '.join(budget_bits) or 'no budget'}; objective weights: {weights}.")
    lines.append("")
    if plan.unmet:
        lines.append("**Not met** (the closest plan found is reported): " + "; ".join(plan.unmet))
    else:
        lines.append("**All budgets met** on held-out data.")
    search_info = plan.metrics.get("search", {})
    checks = search_info.get("confirmation") or []
    line = confirmation_summary(
        checks,
        result.chosen or search.best,
        search_info.get("confidence", 0.5),
        search_info.get("test_samples", 0),
    )
    if line:
        told = ", ".join(
            f"#{c['rank'] + 1}{' backed off' if c.get('backed_off') else ''} "
            f"{100 * c['change_held_out']:+.2f} ± "
            f"{100 * c.get('se_held_out', 0.0):.2f} ({100 * c.get('confidence', 0.0):.0f} %)"
            for c in checks
            if "change_held_out" in c
        )
        fresh = search_info.get("test_samples", 0)
        on = f" on a fresh test set of {fresh:,} samples" if fresh else ""
        lines += ["", f"{line[0].upper()}{line[1:]}.", "", f"Checked (change in points ± paired "
                  f"standard error, confidence the budget holds{on}): {told}."]  # fmt: skip
    lines += ["", "## Baseline and result", "", "| metric | baseline | result | ratio | source |",
              "|---|---:|---:|---:|---|"]  # fmt: skip
    for key, label, spec in _ROWS:
        b, r = base.get(key), res.get(key)
        if b is None and r is None:
            continue
        ratio = (
            f"{r / b:.2f}x"
            if isinstance(b, (int, float)) and isinstance(r, (int, float)) and b
            else ""
        )
        source = "evaluator" if key.startswith("accuracy") else sources.get(key, "")
        lines.append(f"| {label} | {_fmt(b, spec)} | {_fmt(r, spec)} | {ratio} | {source} |")
    if png is not None:
        files["plot"] = png
        lines += ["", "## Pareto front", "", f"![Pareto front]({png.name})", ""]
    lines += ["", "## Per layer", "",
              "| layer | op | passes | decided by | alone: accuracy Δ | alone: latency Δ ms |",
              "|---|---|---|---|---:|---:|"]  # fmt: skip
    alone = _alone(result, units)
    base_acc, base_lat = base.get("accuracy"), base.get("latency")
    chosen_by_unit = dict(enumerate(result.chosen or search.best))
    effects: dict[str, tuple[str, str]] = {}
    for i, unit in enumerate(units):
        c = chosen_by_unit.get(i, 0)
        m = alone.get((i, c)) if c else None
        if m is None:
            continue
        acc = f"{m['accuracy'] - base_acc:+.4f}" if base_acc is not None else ""
        lat = (
            f"{m['latency'] - base_lat:+.3f}"
            if base_lat is not None and m.get("latency") is not None
            else ""
        )
        for layer in unit.options[c].payload or {}:
            effects[layer] = (acc, lat)
    for lp in plan.layers:
        passes = ", ".join(s.text() for s in lp.steps) or "keep"
        acc, lat = effects.get(lp.layer, ("", ""))
        lines.append(f"| `{lp.layer}` | {lp.op} | {passes} | {lp.why or '–'} | {acc} | {lat} |")
    notes = [
        "",
        "Storage passes (quantize_weights, cluster_weights) shrink the file; their weights are "
        "decoded at load or per run, so they do not make inference faster.",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in plan.versions.items())}.",
        "",
    ]
    path = folder / "report.md"
    tmp = folder / ".report.md.tmp"
    tmp.write_text("\n".join(lines + notes), encoding="utf-8")
    tmp.replace(path)
    files["report"] = path
    return files
