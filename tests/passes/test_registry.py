"""Tests for the pass registry: lookup, suggestions, duplicates and third-party entry points."""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint

import pytest

from tailor.errors import UnknownPassError
from tailor.ir.model import Model
from tailor.passes import (
    Pass,
    PassContext,
    PassManager,
    PassResult,
    available_passes,
    get_pass,
    register,
)
from tailor.passes import registry as registry_module
from tailor.passes.fuse import Fuse
from tests.helpers import make_model

GROUP = registry_module.ENTRY_POINT_GROUP


class PluginPass(Pass):
    """Marks the model as seen by a plugin (test only)."""

    name = "Test_Plugin_Mark"
    lossless = True

    def run(self, model: Model, context: PassContext) -> PassResult:
        return PassResult(model, False, ["plugin ran"])


class ClashingPlugin(Pass):
    """Claims the name of an in-tree pass (test only)."""

    name = "fuse"


NOT_A_PASS = object()


def _ep(name: str, attr: str) -> EntryPoint:
    return EntryPoint(name, f"{__name__}:{attr}", GROUP)


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private copy of the registry: nothing registered in a test outlives it."""
    registry = dict(available_passes())
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)
    monkeypatch.setattr(registry_module, "_BROKEN", {})
    return registry


def _install(monkeypatch: pytest.MonkeyPatch, eps: list[EntryPoint]) -> list[str]:
    """Makes the registry see `eps` as the installed entry points; returns call log."""
    calls: list[str] = []

    def fake_entry_points(*, group: str) -> list[EntryPoint]:
        calls.append(group)
        return [ep for ep in eps if ep.group == group]

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry_module, "_plugins_loaded", False)
    return calls


# ---------------------------------------------------------------- lookup
@pytest.mark.parametrize("name", ["fuse", "FUSE", "Fuse", "  fuse "])
def test_lookup_is_case_insensitive(name):
    assert get_pass(name) is Fuse


def test_available_passes_are_sorted_lower_case_names():
    passes = available_passes()
    assert list(passes) == sorted(passes)
    assert all(key == cls.name.lower() for key, cls in passes.items())
    assert {"fuse", "fold_batchnorm", "eliminate_dead"} <= set(passes)


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("fold_batchnrom", "fold_batchnorm"), ("FOLD_BATCHNROM", "fold_batchnorm"), ("fuze", "fuse")],
)
def test_unknown_name_suggests_close_names(typo, suggestion):
    with pytest.raises(UnknownPassError) as info:
        get_pass(typo)
    message = str(info.value)
    assert f"unknown pass {typo!r}" in message
    assert f"did you mean {suggestion}" in message


def test_unknown_name_without_a_close_one_lists_all():
    with pytest.raises(UnknownPassError, match="known passes: .*fuse"):
        get_pass("zzzzzzzzzzzz")


# ---------------------------------------------------------------- registration
def test_register_and_use_through_pipeline_text(isolated_registry):
    assert register(PluginPass) is PluginPass
    assert get_pass("test_plugin_mark") is PluginPass
    pm = PassManager.from_text("TEST_PLUGIN_MARK")
    assert pm.to_text() == "Test_Plugin_Mark"
    result = pm.run(make_model(_TINY))
    assert result.records[0].changes == ["plugin ran"]


def test_registering_the_same_class_twice_is_harmless(isolated_registry):
    register(PluginPass)
    register(PluginPass)
    assert get_pass("test_plugin_mark") is PluginPass


@pytest.mark.parametrize("name", ["fuse", "FUSE", "Fold_BatchNorm"])
def test_duplicate_name_is_refused(isolated_registry, name):
    impostor = type("Impostor", (Pass,), {"name": name, "__doc__": "Not the real one."})
    with pytest.raises(
        ValueError, match=rf"pass name {name!r} is already taken by tailor\.passes\."
    ):
        register(impostor)
    assert get_pass(name) is not impostor


@pytest.mark.parametrize(
    "bad",
    [
        object,
        NOT_A_PASS,
        type("Nameless", (Pass,), {}),
        type("Spaced", (Pass,), {"name": "my pass"}),
        type("Parens", (Pass,), {"name": "x(y)"}),
    ],
)
def test_register_refuses_what_pipeline_text_cannot_name(isolated_registry, bad):
    with pytest.raises(TypeError):
        register(bad)


# ---------------------------------------------------------------- entry points
def test_third_party_pass_from_entry_point(isolated_registry, monkeypatch):
    calls = _install(monkeypatch, [_ep("test_plugin_mark", "PluginPass")])
    assert get_pass("test_plugin_mark") is PluginPass
    assert available_passes()["test_plugin_mark"] is PluginPass
    assert calls == [GROUP]  # entry points are read once, not on every lookup
    assert PassManager.from_text("fuse,test_plugin_mark").to_text() == "fuse,Test_Plugin_Mark"


@pytest.mark.parametrize(
    ("ep", "reason"),
    [
        (EntryPoint("broken_mod", "tailor_test_no_such_module:Pass", GROUP), "ModuleNotFoundError"),
        (EntryPoint("broken_attr", f"{__name__}:NoSuchClass", GROUP), "AttributeError"),
        (_ep("broken_type", "NOT_A_PASS"), "TypeError"),
        (_ep("clash", "ClashingPlugin"), "already taken"),
    ],
)
def test_broken_entry_point_is_a_warning_not_a_crash(
    isolated_registry, monkeypatch, caplog, ep, reason
):
    _install(monkeypatch, [ep, _ep("test_plugin_mark", "PluginPass")])
    with caplog.at_level(logging.WARNING, logger=registry_module.__name__):
        # the good plugin and the in-tree passes still load
        assert get_pass("test_plugin_mark") is PluginPass
        assert get_pass("fuse") is Fuse
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"ignoring third-party pass {ep.name} ({ep.value})" in warnings[0]
    assert reason in warnings[0]
    if ep.name != "clash":
        # naming the broken plugin says why it is missing, not just "unknown"
        with pytest.raises(UnknownPassError, match=f"failed to load: {ep.name} = .*{reason}"):
            get_pass(ep.name)


_TINY = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,4] x) => (float[N,4] y) {
  y = Relu (x)
}
"""
