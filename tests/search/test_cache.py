"""Resumable search state: every evaluation on disk at once, replayed on restart, a cut
last line tolerated, another search's file set aside."""

from __future__ import annotations

import json

import pytest

from tailor.demands import Demands
from tailor.search.base import STRATEGIES, Budget, search
from tailor.search.cache import CachedProblem
from tests.search import Synthetic

FULL = {"greedy": 60, "evolutionary": 60, "rl": 40}


def _lines(path):
    return path.read_text().splitlines()


def test_each_evaluation_is_one_line_after_a_header(tmp_path):
    inner = Synthetic(3, 0, fail={(0, 0, 2)})
    cached = CachedProblem(inner, tmp_path / "state" / "s.jsonl", key="abc")
    out = cached.evaluate([(1, 0, 0), (0, 0, 2)])
    lines = _lines(tmp_path / "state" / "s.jsonl")
    assert json.loads(lines[0]) == {"tailor_search_state": 1, "key": "abc"}
    first, second = json.loads(lines[1]), json.loads(lines[2])
    assert first["a"] == [1, 0, 0] and first["m"] == out[0].metrics and first["e"] is None
    assert second["m"] is None and second["e"] == "pass failed on (0, 0, 2)"
    assert (cached.units, cached.baseline) == (inner.units, inner.baseline)


def test_a_restart_answers_from_the_file(tmp_path):
    path = tmp_path / "s.jsonl"
    first = CachedProblem(Synthetic(3, 0, fail={(0, 0, 2)}), path, key="k")
    before = first.evaluate([(1, 0, 0), (0, 0, 2)])
    inner = Synthetic(3, 0)  # would not fail now: the cached failure still answers
    again = CachedProblem(inner, path, key="k")
    assert again.cached == 2
    out = again.evaluate([(0, 0, 2), (1, 0, 0), (2, 2, 2)])
    assert inner.calls == [(2, 2, 2)]
    assert out[0].error == before[1].error and out[1].metrics == before[0].metrics
    assert (again.hits, again.misses) == (2, 1)
    assert len(_lines(path)) == 4


def test_a_cut_last_line_is_dropped_and_the_file_repaired(tmp_path):
    path = tmp_path / "s.jsonl"
    CachedProblem(Synthetic(3, 0), path, key="k").evaluate([(1, 0, 0), (0, 1, 0)])
    text = path.read_text()
    path.write_text(text + '{"a": [0, 0, 1], "m": {"accur')  # kill -9 mid-write
    inner = Synthetic(3, 0)
    again = CachedProblem(inner, path, key="k")
    assert again.cached == 2
    again.evaluate([(0, 0, 1)])
    assert inner.calls == [(0, 0, 1)]
    assert [json.loads(line)["a"] for line in _lines(path)[1:]] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_a_damaged_middle_line_is_skipped(tmp_path):
    path = tmp_path / "s.jsonl"
    CachedProblem(Synthetic(3, 0), path, key="k").evaluate([(1, 0, 0), (0, 1, 0)])
    lines = _lines(path)
    path.write_text("\n".join([lines[0], "garbage", lines[2], '{"a": [1, 1]}']) + "\n")
    again = CachedProblem(Synthetic(3, 0), path, key="k")
    assert again.cached == 1 and again.evaluate([(0, 1, 0)]) and again.misses == 0


@pytest.mark.parametrize("header", ['{"tailor_search_state": 1, "key": "other"}', "not json"])
def test_another_search_s_file_is_set_aside(tmp_path, header):
    path = tmp_path / "s.jsonl"
    path.write_text(header + '\n{"a": [1, 0, 0], "m": {"accuracy": 0.0}, "e": null, "s": 0}\n')
    inner = Synthetic(3, 0)
    cached = CachedProblem(inner, path, key="k")
    assert cached.cached == 0
    assert (tmp_path / "s.jsonl.old").read_text().startswith(header)
    assert cached.evaluate([(1, 0, 0)])[0].metrics["accuracy"] > 0.8
    assert inner.calls == [(1, 0, 0)]


class Killed(BaseException):
    """Stands for kill -9: nothing in the search catches it."""


class DiesAfter(Synthetic):
    """Dies on its (k+1)-th evaluation."""

    def __init__(self, k: int, *args):
        super().__init__(*args)
        self.k = k

    def evaluate(self, assignments):
        if len(self.calls) + len(assignments) > self.k:
            raise Killed
        return super().evaluate(assignments)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_killed_search_resumes_to_the_same_result(tmp_path, strategy):
    d = Demands(max_accuracy_drop=0.02, max_latency_ms=0.6 * Synthetic(6, 1).baseline["latency"])
    budget = Budget(max_evaluations=FULL[strategy])
    straight = search(Synthetic(6, 1), d, strategy, seed=3, budget=budget)
    path = tmp_path / "state.jsonl"
    with pytest.raises(Killed):
        search(
            CachedProblem(DiesAfter(17, 6, 1), path, key="run"), d, strategy, seed=3, budget=budget
        )
    done = {tuple(json.loads(line)["a"]) for line in _lines(path)[1:]}
    assert len(done) == 17
    inner = Synthetic(6, 1)
    resumed = search(CachedProblem(inner, path, key="run"), d, strategy, seed=3, budget=budget)
    assert not done & set(inner.calls)  # nothing cached was evaluated again
    assert len(inner.calls) == straight.evaluations - 17
    assert (resumed.best, resumed.metrics, resumed.front) == (
        straight.best,
        straight.metrics,
        straight.front,
    )
    assert [a for a, _ in resumed.history] == [a for a, _ in straight.history]
