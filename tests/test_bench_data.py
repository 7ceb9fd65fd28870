"""Tests for benchmarks/data.py's restricted unpickler, which reads the HAPT pickle without
pandas: allowed structures load, a synthetic pandas-1.x-style file is parsed into columns,
and pickles naming any other global (os.system, builtins.eval, a non-stand-in class
through copyreg) raise a clear error before anything runs.

The pickles are crafted here: a pure-Python pickler that writes chosen module/name pairs
for stand-in objects produces the pandas globals without pandas being installed.
"""

from __future__ import annotations

import copyreg
import gzip
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from benchmarks import data as bench_data


def restricted_load(raw: bytes):
    return bench_data._RestrictedUnpickler(io.BytesIO(raw)).load()


# ---------------------------------------------------------------------- crafting pickles
class FakeFrame:
    """Pickles as pandas.core.frame.DataFrame (NEWOBJ + BUILD with its state dict)."""

    def __init__(self, state):
        self.state = state

    def __getstate__(self):
        return self.state


class FakeManager(FakeFrame):
    """Pickles as pandas' BlockManager."""


class FakeIndexClass:
    """Pickles as pandas.core.indexes.base.Index (only passed to _new_Index)."""


class FakeNewIndex:
    """Pickles as pandas' `_new_Index` function (a class, since the pure-Python pickler
    dispatches functions past an overridden `save_global`)."""


class FakeIndex:
    """Pickles like a pandas Index: `_new_Index(Index, {"data": ..., "name": None})`."""

    def __init__(self, names):
        self.names = names

    def __reduce__(self):
        return FakeNewIndex, (
            FakeIndexClass,
            {"data": np.array(self.names, object), "name": None},
        )


NAMES = {
    FakeFrame: ("pandas.core.frame", "DataFrame"),
    FakeManager: ("pandas.core.internals.managers", "BlockManager"),
    FakeIndexClass: ("pandas.core.indexes.base", "Index"),
    FakeNewIndex: ("pandas.core.indexes.base", "_new_Index"),
}


class CraftingPickler(pickle._Pickler):
    """The pure-Python pickler, writing `NAMES[obj]` as the global of the stand-ins."""

    def save_global(self, obj, name=None):
        if obj in NAMES:
            module, qualname = NAMES[obj]
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def craft(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    CraftingPickler(buf, protocol).dump(obj)
    return buf.getvalue()


def session_frame(columns: dict[str, np.ndarray]) -> FakeFrame:
    """A pandas 1.x DataFrame as pickled: one float block and one int block."""
    names = list(columns)
    floats = [n for n in names if columns[n].dtype.kind == "f"]
    ints = [n for n in names if n not in floats]
    blocks = [
        {"values": np.stack([columns[n] for n in floats]), "mgr_locs": slice(0, len(floats), 1)},
        {
            "values": np.stack([columns[n] for n in ints]),
            "mgr_locs": np.arange(len(floats), len(names)),
        },
    ]
    axes = [FakeIndex(floats + ints), FakeIndex(list(range(len(columns[names[0]]))))]
    manager = FakeManager(
        (axes, [b["values"] for b in blocks], axes[0], {"0.14.1": {"axes": axes, "blocks": blocks}})
    )
    return FakeFrame({"_mgr": manager, "_typ": "dataframe", "_metadata": [], "attrs": {}})


# ---------------------------------------------------------------------- allowed input
@pytest.mark.parametrize("protocol", [2, 4])
def test_allowed_structures_load(protocol):
    value = {
        3: [np.arange(12, dtype=np.float64).reshape(3, 4), np.array([1, -1], np.int64)],
        "cut": slice(1, 5, 2),
        "names": np.array(["acc-x", "label"], dtype=object),
    }
    got = restricted_load(pickle.dumps(value, protocol=protocol))
    assert set(got) == {3, "cut", "names"}
    np.testing.assert_array_equal(got[3][0], value[3][0])
    assert got[3][1].dtype == np.int64 and list(got[3][1]) == [1, -1]
    assert got["cut"] == slice(1, 5, 2)
    assert list(got["names"]) == ["acc-x", "label"]


def test_synthetic_hapt_file_is_read_into_columns(tmp_path):
    rng = np.random.default_rng(0)
    t = 50
    columns = {c: rng.standard_normal(t) for c in bench_data.HAPT_CHANNELS}
    columns["sequence"] = np.arange(t, dtype=np.int64)
    columns["label"] = np.full(t, 4, np.int64)
    path = tmp_path / "HAPT.pkl.gz"
    with gzip.open(path, "wb") as f:
        f.write(craft({7: [session_frame(columns)]}))
    sessions = bench_data.read_hapt_sessions(path)
    assert list(sessions) == [7] and len(sessions[7]) == 1
    got = sessions[7][0]
    assert set(got) == set(columns)
    for name, values in columns.items():
        np.testing.assert_array_equal(got[name], values)


# ---------------------------------------------------------------------- hostile input
class Runs:
    """Pickles as `call(*args)`: what a hostile file would run on an unrestricted load."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def hostile_pickles(marker: Path) -> dict[str, bytes]:
    command = f"touch {marker}"
    source = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": pickle.dumps(Runs(os.system, command), protocol=2),
        "os.system, protocol 5": pickle.dumps({"x": [Runs(os.system, command)]}, protocol=5),
        "builtins.eval": pickle.dumps(Runs(eval, source), protocol=2),
        "builtins.exec inside a frame": craft(FakeFrame({"_mgr": Runs(exec, source)})),
        # Hand-written opcodes: GLOBAL 'os system', a string, TUPLE1, REDUCE, STOP.
        "raw GLOBAL os.system": b"\x80\x02cos\nsystem\nX"
        + len(command).to_bytes(4, "little")
        + command.encode()
        + b"\x85R.",
    }


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "os.system, protocol 5",
        "builtins.eval",
        "builtins.exec inside a frame",
        "raw GLOBAL os.system",
    ],
)
def test_hostile_globals_are_refused_and_nothing_runs(tmp_path, name):
    marker = tmp_path / "ran"
    raw = hostile_pickles(marker)[name]
    # The crafted pickles really are hostile: an unrestricted load would run them.
    with pytest.raises(
        pickle.UnpicklingError,
        match=r"names \S+\.(system|eval|exec), which the restricted loader does not allow",
    ):
        restricted_load(raw)
    assert not marker.exists()
    path = tmp_path / "HAPT.pkl.gz"
    with gzip.open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(pickle.UnpicklingError, match="does not allow"):
        bench_data.read_hapt_sessions(path)
    assert not marker.exists()


def test_unrestricted_load_of_a_crafted_pickle_would_run(tmp_path):
    # The control: the same bytes, loaded by plain pickle, do run (so the test above can fail).
    marker = tmp_path / "ran"
    pickle.loads(hostile_pickles(marker)["builtins.eval"])
    assert marker.exists()


def test_reconstructor_only_builds_the_stand_ins():
    # copyreg._reconstructor is allowed, but only for the inert DataFrame/BlockManager.
    raw = pickle.dumps(Runs(copyreg._reconstructor, bytearray, object, None), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"builtin\w*\.bytearray"):
        restricted_load(raw)
    raw = pickle.dumps(Runs(copyreg._reconstructor, object, object, None), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to reconstruct"):
        restricted_load(raw)
