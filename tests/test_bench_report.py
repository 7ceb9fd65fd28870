"""Tests for benchmarks/compress_report.py's summary of repeated runs: a run and its
`@rK` repeats on the same code are counted together (budget met, every single beaten);
other suffixes, other commits, other trained models and single runs are not."""

from __future__ import annotations

from benchmarks.compress_report import repeats


def rows(model: str, change: float, plan_objective: float) -> list[dict]:
    base = 0.9
    return [
        {"model": model, "kind": "baseline", "status": "ok", "accuracy": base,
         "objective": 0.75, "meets_budget": True},
        {"model": model, "kind": "plan", "status": "ok", "accuracy": base + change / 100,
         "objective": plan_objective, "meets_budget": change >= -1},
        {"model": model, "kind": "single", "status": "ok", "accuracy": base - 0.006,
         "objective": 0.18, "meets_budget": True},
        {"model": model, "kind": "single", "status": "ok", "accuracy": base - 0.03,
         "objective": 0.05, "meets_budget": False},
    ]  # fmt: skip


def test_repeats_count_runs_of_the_same_code_and_seed():
    runs = {"hapt": (+0.21, 0.07, "abc"), "hapt@r2": (-1.04, 0.06, "abc"),
            "hapt@r3": (+0.0, 0.2, "abc"), "hapt@s1": (-2.0, 0.1, "abc"),
            "vgg": (-0.5, 0.2, "abc"), "resnet@r2": (-0.3, 0.2, "old"),
            "resnet": (-0.3, 0.2, "new")}  # fmt: skip
    payload = {
        "model_order": list(runs),
        "models": {n: {"git_commit": c, "seed": 0} for n, (_, _, c) in runs.items()},
        "rows": [r for n, (d, o, _) in runs.items() for r in rows(n, d, o)],
    }
    (line,) = repeats(payload)
    assert line.startswith("- hapt: 3 runs on abc, seed 0 (hapt, hapt@r2, hapt@r3)")
    assert "budget met in 2 of 3 (+0.21, -1.04, +0.00 points)" in line
    assert line.endswith("beaten in 2 of 3")  # hapt@r3's 0.2 loses to the 0.18 single
    payload["models"]["hapt@r2"]["seed"] = 1  # seeds differ: not named
    assert ", seed" not in repeats(payload)[0]


def test_repeats_keep_runs_on_other_trained_models_apart():
    runs = {"vgg": "m1", "vgg@r2": "m2", "vgg@r3": "m2"}
    payload = {
        "model_order": list(runs),
        "models": {n: {"git_commit": "abc", "seed": 0, "model_sha256": s} for n, s in runs.items()},
        "rows": [r for n in runs for r in rows(n, -0.5, 0.1)],
    }
    (line,) = repeats(payload)  # vgg alone on m1 is a single run: no line
    assert line.startswith("- vgg: 2 runs on abc, seed 0, model m2 (vgg@r2, vgg@r3)")
