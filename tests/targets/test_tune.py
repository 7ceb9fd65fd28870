"""MetaSchedule tuning: a tiny conv tuned over loopback RPC fills the database, Ctrl-C
keeps the finished batch, a resumed run measures only what is missing, a finished one
measures nothing; the database survives a kill mid-write."""

from __future__ import annotations

import os
import signal

import pytest

from tailor.cli import main
from tailor.errors import TailorError, TargetError
from tailor.targets.tune import (
    TuneInterrupted,
    _locked,
    _repair_jsonl,
    build_tuned,
    database_dir,
    open_database,
    tune,
    tuned_tasks,
)
from tailor.targets.tvm_build import compare_with_onnxruntime

RECORDS = "database_tuning_record.json"


def records(folder) -> int:
    path = folder / RECORDS
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_tune_over_rpc_resumes_after_ctrl_c_and_never_measures_twice(
    rpc_farm, tiny_conv, tmp_path, capsys
):
    cache = tmp_path / "cache"
    common = dict(
        trials=4,
        trials_per_batch=2,
        rpc=rpc_farm.address,
        key=rpc_farm.key,
        cache_dir=cache,
        threads=2,
        seed=0,
    )

    def ctrl_c_after_first_batch(progress):
        # A real SIGINT to this process: tailor's handler lets the batch finish and stops.
        if progress.measured == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TuneInterrupted) as info:
        tune(tiny_conv, "host", progress=ctrl_c_after_first_batch, **common)
    first = info.value.result
    folder = database_dir("host", cache)
    assert first.interrupted and first.database_dir == folder
    assert [(t.trials_before, t.trials) for t in first.tasks] == [(0, 2)]
    assert records(folder) == 2  # the finished batch is on disk

    seen = []
    second = tune(tiny_conv, "host", progress=seen.append, **common)
    assert [(t.trials_before, t.trials) for t in second.tasks] == [(2, 4)]
    assert second.measured == 2 and records(folder) == 4
    assert [p.measured for p in seen] == [2] and seen[-1].planned == 2
    task = second.tasks[0]
    assert task.name == "fused_conv2d_add_relu" and task.weight == 1
    assert task.best_us is not None and task.best_us > 0 and task.flops > 0

    third = tune(tiny_conv, "host", **common)
    assert third.measured == 0 and records(folder) == 4
    assert third.tasks[0].best_us == pytest.approx(task.best_us)

    # The CLI on the same database: nothing to measure, one summary.
    args = ["tune", str(tiny_conv), "-t", "host", "--trials", "4", "--cache-dir", str(cache)]
    assert main([*args, "--rpc", rpc_farm.address, "--key", rpc_farm.key]) == 0
    out = capsys.readouterr().out
    assert "fused_conv2d_add_relu" in out and "0 new measurement(s)" in out
    assert records(folder) == 4

    # What a cost model reads: the database's numbers, without measuring.
    [known] = tuned_tasks(tiny_conv, "host", cache_dir=cache)
    assert (known.trials, known.best_us) == (4, pytest.approx(task.best_us))

    # The tuned schedules build and compute what onnxruntime computes.
    built = build_tuned(tiny_conv, "host", cache_dir=cache)
    assert built.tuned
    assert compare_with_onnxruntime(tiny_conv, built).max_rel <= 1e-5


def test_tune_refuses_a_remote_target_without_rpc(tiny_conv, tmp_path):
    with pytest.raises(TargetError, match=r"--rpc HOST:PORT --key NAME"):
        tune(tiny_conv, "jetson-nano", cache_dir=tmp_path)
    with pytest.raises(TailorError, match="needs the device key"):
        tune(tiny_conv, "host", rpc="127.0.0.1:9190", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_tuned_tasks_without_a_database(tiny_conv, tmp_path):
    [task] = tuned_tasks(tiny_conv, "host", cache_dir=tmp_path)
    assert task.name == "fused_conv2d_add_relu" and task.trials == 0 and task.best_us is None
    assert not list(tmp_path.iterdir())  # reading creates nothing


def test_database_is_keyed_by_target_definition(tmp_path):
    from tailor.targets import Target, get_target

    rpi4 = get_target("rpi4")
    other = Target.from_dict(
        {**rpi4.to_dict(), "tvm_target": {**rpi4.to_dict()["tvm_target"], "mcpu": "cortex-a53"}}
    )
    assert (
        database_dir(rpi4, tmp_path).parent
        == database_dir(other, tmp_path).parent
        == tmp_path / "rpi4"
    )
    assert database_dir(rpi4, tmp_path) != database_dir(other, tmp_path)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from tailor.targets.tune import default_cache_dir

    monkeypatch.delenv("TAILOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tailor" / "tune"
    monkeypatch.setenv("TAILOR_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" / "tune"


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        (b"[0, 1]\n[1, 2]\n[2, 3", b"[0, 1]\n[1, 2]\n"),  # killed mid-line
        (b"[0, 1]\n[1, 2]\n[2, ", b"[0, 1]\n[1, 2]\n"),
        (b"[0, 1]\n[1, 2]\n", b"[0, 1]\n[1, 2]\n"),  # intact
        (b"[0, 1]\n[1, 2]", b"[0, 1]\n[1, 2]"),  # intact, no final newline
        (b"[0, ", b""),
    ],
)
def test_a_record_cut_by_a_kill_is_dropped(tmp_path, content, kept):
    path = tmp_path / RECORDS
    path.write_bytes(content)
    _repair_jsonl(path)
    assert path.read_bytes() == kept


def test_open_database_after_a_kill_mid_write(tmp_path):
    folder = database_dir("host", tmp_path)
    folder.mkdir(parents=True)
    (folder / "database_workload.json").write_text("")
    (folder / RECORDS).write_text('[0, [[["GetSBlo')
    database = open_database("host", tmp_path)
    assert len(database) == 0
    assert (folder / "target.json").exists()
    assert open_database("jetson-nano", tmp_path, create=False) is None


def test_one_tuning_process_per_database(tmp_path):
    with _locked(tmp_path):
        with pytest.raises(TailorError, match="in use by another `tailor tune`"):
            with _locked(tmp_path):
                pass
    with _locked(tmp_path):  # released
        pass
