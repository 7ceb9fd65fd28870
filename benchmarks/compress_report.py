"""Renders benchmarks/results/compress.json (written by benchmarks/compress.py) as
Markdown: the header, the checks the issue asks for, and one table per model."""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["checks", "render_markdown"]

logger = logging.getLogger(__name__)


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok" and "objective" in r]


def _verdict(plan: dict[str, Any], other: dict[str, Any]) -> str:
    beats = plan["objective"] < other["objective"]
    return (
        f"{'**beats**' if beats else '**does not beat**'} `{other['row']}` "
        f"(objective {plan['objective']:.4f} vs {other['objective']:.4f}"
        f"{'' if other['meets_budget'] else '; that row breaks the budget'})"
    )


def _against_best(plan: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[str, int]:
    """The plan's verdict against the best of `rows` by objective, and how many of them
    it beats."""
    best = min(rows, key=lambda r: r["objective"])
    return _verdict(plan, best), sum(plan["objective"] < r["objective"] for r in rows)


def _search_line(name: str, info: dict[str, Any]) -> str:
    s = info.get("search")
    if not s:
        return f"- {name}: compress failed: {info.get('error', 'no search recorded')}"
    minutes = s["compress_wall_seconds"] / 60
    limits = {k: v for k, v in (s.get("budget") or {}).items() if v is not None}
    budget = ", ".join(f"{k} {v:g}" for k, v in limits.items()) or "none"
    if "budget" not in s:
        budget = "not recorded"
    return (
        f"- {name}: compress took {s['compress_wall_seconds']:.0f} s ({minutes:.1f} min; search "
        f"{s['search_seconds']:.0f} s, {s['evaluations']} evaluations, "
        f"{s['failed_evaluations']} failed, "
        f"{'stopped by its budget' if s['stopped_by_budget'] else 'finished by itself'}; "
        f"budget: {budget}; run {info.get('date', '?')}"
        f"{', code ' + info['git_commit'] if 'git_commit' in info else ''}) for "
        f"{info['params'] / 1e6:.2f} M parameters, {info['macs'] / 1e6:.1f} M MACs, "
        f"{info['units']} units / {info['options']} options; load average "
        f"{' '.join(map(str, s['load_average_before']))} before, "
        f"{' '.join(map(str, s['load_average_after']))} after"
        + ("" if minutes < 10 else " (**over 10 minutes**)")
        + _extrapolation(info, s)
    )


def _extrapolation(info: dict[str, Any], s: dict[str, Any]) -> str:
    """For a search its budget stopped: how many options it measured alone, and how long
    all of them would take at the measured rate (an estimate, labelled so)."""
    if not s["stopped_by_budget"] or not s["evaluations"] or "options_alone" not in s:
        return ""
    alone, plans = s["options_alone"], s["evaluations"] - s["options_alone"]
    if not alone:
        return ""
    rate = s.get("options_alone_seconds", s["search_seconds"]) / alone
    return (
        f"; it measured {alone} of the {info['options']} options alone and {plans} "
        f"multi-layer plans (uniform, repaired, steps, polish); every option alone would take "
        f"about {info['options'] * rate / 60:.0f} min at the measured {rate:.1f} s per "
        "option (extrapolated, not measured)"
    )


def _outcome(rows: list[dict[str, Any]]) -> tuple[float, bool, bool] | None:
    """(the plan's change in points on the report half, whether it meets the budget,
    whether it beats every uniform single technique within the budget), or None."""
    ok = _ok(rows)
    plan = next((r for r in ok if r["kind"] == "plan"), None)
    base = next((r for r in ok if r["kind"] == "baseline"), None)
    if plan is None or base is None:
        return None
    within = [r for r in ok if r["kind"] == "single" and r["meets_budget"]]
    beats = all(plan["objective"] < r["objective"] for r in within)
    return 100 * (plan["accuracy"] - base["accuracy"]), bool(plan["meets_budget"]), beats


def repeats(payload: dict[str, Any]) -> list[str]:
    """One line per run repeated on the same code and trained model (`NAME` and `NAME@rK`):
    the guarantee is statistical, so how often the plan met the budget and beat every
    single technique."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for name in payload.get("model_order", []):
        match = re.fullmatch(r"(.+?)(@r\d+)?", name)
        info = payload["models"].get(name, {})
        if match and "@" not in match.group(1) and "git_commit" in info:
            key = (match.group(1), info["git_commit"], info.get("model_sha256", ""))
            groups.setdefault(key, []).append(name)
    lines = []
    for (base, commit, sha), names in groups.items():
        outcomes = [_outcome([r for r in payload["rows"] if r["model"] == n]) for n in names]
        done = [o for o in outcomes if o is not None]
        seeds = {payload["models"][n].get("seed") for n in names}
        seed = f", seed {seeds.pop()}" if len(seeds) == 1 and None not in seeds else ""
        if len(done) < 2:
            continue
        lines.append(
            f"- {base}: {len(done)} runs on {commit}{seed}{f', model {sha[:12]}' if sha else ''} "
            f"({', '.join(names)}): the budget met in "
            f"{sum(o[1] for o in done)} of {len(done)} "
            f"({', '.join(f'{o[0]:+.2f}' for o in done)} points), every uniform single "
            f"technique within it beaten in {sum(o[2] for o in done)} of {len(done)}"
        )
    return lines


def checks(payload: dict[str, Any]) -> list[str]:
    """The issue's checks, one bullet each, from the measured rows."""
    lines: list[str] = []
    models = payload.get("models", {})
    for name in payload.get("model_order", []):
        rows = [r for r in payload["rows"] if r["model"] == name]
        if name.startswith("resnet18"):
            continue
        ok = _ok(rows)
        plan = next((r for r in ok if r["kind"] == "plan"), None)
        base = next((r for r in ok if r["kind"] == "baseline"), None)
        if plan is None or base is None:
            lines.append(f"- {name}: no plan measured ({models.get(name, {}).get('error', '')})")
            continue
        drop = 100 * (base["accuracy"] - plan["accuracy"])
        lines.append(
            f"- {name}: the plan changes accuracy by {-drop:+.2f} points on the report half "
            f"({plan['accuracy']:.4f} vs {base['accuracy']:.4f}; budget 1 point): "
            + (
                "**met**"
                if plan["meets_budget"]
                else f"**NOT met** ({'; '.join(plan['violations'])})"
            )
            + _own_verify(models.get(name, {}))
        )
        singles = [r for r in ok if r["kind"] == "single"]
        within = [r for r in singles if r["meets_budget"]]
        if within:
            verdict, beaten = _against_best(plan, within)
            lines.append(
                f"- {name}: against the best uniform single technique within the budget, the "
                f"plan {verdict}; it beats {beaten} of the {len(within)} single "
                f"techniques within the budget and "
                f"{sum(plan['objective'] < r['objective'] for r in singles)} of all {len(singles)}"
            )
        else:
            lines.append(f"- {name}: no uniform single technique meets the budget")
        chosen = [r for r in singles if r.get("meets_budget_search_half")]
        if chosen and "meets_budget_search_half" in plan:
            verdict, beaten = _against_best(plan, chosen)
            lines.append(
                f"- {name}: against the best uniform single technique a user could pick on the "
                f"search half (within the budget there: the data compress had), the plan "
                f"{verdict}; it beats {beaten} of those {len(chosen)}"
            )
        for kind in ("peer", "same-macs"):
            other = next((r for r in ok if r["kind"] == kind), None)
            if other is not None:
                lines.append(f"- {name}: the plan {_verdict(plan, other)}")
    lines += repeats(payload)
    for name in payload.get("model_order", []):
        if name in models:
            lines.append(_search_line(name, models[name]))
    return lines


def _own_verify(info: dict[str, Any]) -> str:
    """What compress itself found on its search and verify parts of the search half."""
    s = info.get("search")
    if not s:
        return ""
    base, res = s["compress_baseline"], s["compress_result"]
    if "accuracy_held_out" not in base or "accuracy_held_out" not in res:
        return ""
    unmet = s["unmet_held_out"]
    verdict = "met" if not unmet else f"**NOT met**: {'; '.join(unmet)}"
    return (
        f"; compress's own verify part of the search half: "
        f"{100 * (res['accuracy_held_out'] - base['accuracy_held_out']):+.2f}"
        + (f" ± {100 * res['accuracy_held_out_se']:.2f}" if "accuracy_held_out_se" in res else "")
        + f" points ({verdict}"
        + (f"; {s['confirmation']}" if s.get("confirmation") else "")
        + "); its search part: "
        f"{100 * (res.get('accuracy_measured', res['accuracy']) - base['accuracy']):+.2f}"
        + (
            f" (less one paired standard error, what the search ranks: "
            f"{100 * (res['accuracy'] - base['accuracy']):+.2f})"
            if "accuracy_se" in res
            else ""
        )
    )


def _x(value: float | None, base: float | None) -> str:
    return "" if value is None or not base else f" ({value / base:.2f}x)"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    base = next((r for r in rows if r["kind"] == "baseline" and r.get("status") == "ok"), None)
    out = [
        "| row | held-out acc | Δ points | budget | storage KiB | MACs M | latency ms [IQR] "
        "| energy mJ | objective | build s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"| {r['row']} | error: {r.get('error', '')} |||||||||")
            continue
        lat = r.get("latency_ms", {})
        acc = r.get("accuracy")
        delta = "" if acc is None or base is None else f"{100 * (acc - base['accuracy']):+.2f}"
        budget = "" if "meets_budget" not in r else ("met" if r["meets_budget"] else "**broken**")
        out.append(
            f"| {r['row']} | {'' if acc is None else f'{acc:.4f}'} | {delta} | {budget} | "
            f"{r['storage_bytes'] / 1024:.1f}{_x(r['storage_bytes'], base and base['storage_bytes'])} | "
            f"{r['macs'] / 1e6:.2f}{_x(r['macs'], base and base['macs'])} | "
            f"{lat.get('median', float('nan')):.3f}"
            f"{_x(lat.get('median'), base and base['latency_ms']['median'])} "
            f"[{lat.get('q1', float('nan')):.3f}–{lat.get('q3', float('nan')):.3f}] | "
            f"{r.get('energy_mj', float('nan')):.3f} | "
            f"{'' if 'objective' not in r else format(r['objective'], '.4f')} | "
            f"{r.get('build_seconds', '')} |"
        )
    return out


def _model_section(name: str, info: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    model = f"; model sha256 {info['model_sha256'][:12]}" if "model_sha256" in info else ""
    out = [
        f"## {name}",
        "",
        f"{info.get('architecture', '')}; {info.get('dataset', '')}{model}",
        "",
    ]
    if "error" in info:
        return out + [
            f"compress failed: `{info['error']}`",
            "",
            "```",
            info.get("traceback", ""),
            "```",
            "",
        ]
    s = info["search"]
    if name.startswith("resnet18"):
        out.append(
            "Accuracy here is fidelity: top-1 agreement with the original model on the part "
            "of the calibration inputs that compress held out."
        )
    if "search_samples" in info:
        out.append(
            f"Search half {info['search_samples']} samples (compress: {s['evaluation']}); "
            f"report half {info['report_samples']} samples."
        )
    out += [
        f"Search: {s['evaluations']} evaluations in {s['search_seconds']:.0f} s, compress "
        f"{s['compress_wall_seconds']:.0f} s in all; "
        f"{'feasible' if s['feasible_in_search'] else 'NOT feasible'} in the search; "
        f"held-out budgets unmet: {', '.join(s['unmet_held_out']) or 'none'}. "
        f"compress's own report: [{name}/report.md](compress/{name}/report.md).",
        "",
        "Plan (layer: steps): "
        + (
            "; ".join(f"`{k}`: {', '.join(v)}" for k, v in s["changed_layers"].items())
            or "no change"
        ),
        "",
        *_table(rows),
        "",
    ]
    return out


def render_markdown(payload: dict[str, Any]) -> str:
    """The results as a Markdown report: header, checks, one table per model."""
    meta, machine = payload["meta"], payload["meta"]["machine"]
    weights = ", ".join(f"{k} {v:g}" for k, v in meta["demands"]["weights"].items() if v)
    power = meta["host_power_w"]
    out = [
        "# tailor compress on real trained models",
        "",
        f"Generated by `python -m benchmarks.compress`, last run {meta['date']} (each model's "
        f"run date is in its check line); tailor {meta['tailor']}, "
        f"python {machine['python']}, onnx {machine['onnx']}, onnxruntime {machine['onnxruntime']}, "
        f"numpy {machine['numpy']}, torch {machine['torch']}.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['platform']}); load "
        f"average {meta['load_average']} at the start of the last run (shared machine: other "
        "work ran beside it; each model's load averages are in its check line).",
        "",
        f"Demands: at most {100 * meta['demands']['max_accuracy_drop']:g} point(s) of accuracy "
        f"lost on held-out data; weights {weights}; target `host`; strategy "
        f"`{meta['strategy']}`, seed {meta['seed']}.",
        f"Protocol: each test set is split in halves (seed {meta['split_seed']}); compress gets "
        "the search half as labels (and splits it again into search and verify parts); every "
        "accuracy below is on the report half, which the search never saw. Calibration: 512 "
        "training inputs. Latency: onnxruntime CPU, batch 1, "
        f"{meta['latency_threads']} thread, median of {meta['runs']} runs after "
        f"{meta['warmup']} warm-up runs, interleaved over all rows of a model. Energy: latency x "
        f"({power['power_active_w']:g} W active - {power['power_idle_w']:g} W idle), the host "
        "target's power model. Storage: exact file bytes. MACs: tailor.cost_models.macs "
        "(quantized layers count as float ones). Objective: tailor.demands.Normalizer over "
        "all measured rows of the model, with the demands' weights (lower is better). The "
        "best single technique is picked on the report half, which favours it; a second line "
        "picks it as a user would, among the techniques within the budget on the search half.",
        "",
        "## Checks",
        "",
        *checks(payload),
        "",
    ]
    for name in payload.get("model_order", []):
        rows = [r for r in payload["rows"] if r["model"] == name]
        out += _model_section(name, payload["models"].get(name, {}), rows)
    return "\n".join(out)
