"""Tests for pass parameters: every kind, bounds, REQUIRED, unknown names, wrong types, help text."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tailor.cli import main
from tailor.errors import ParameterError
from tailor.passes import REQUIRED, Param, Pass, PassManager, register
from tailor.passes import registry as registry_module
from tailor.passes.base import format_value


class Knobs(Pass):
    """Turns every knob (test only).

    A second paragraph that only `tailor passes knobs` shows.
    """

    name = "test_params_knobs"
    params = (
        Param("count", "int", 2, "how many", low=1, high=8),
        Param("ratio", "float", 0.5, "a fraction", low=0.0, high=1.0),
        Param("scale", "float", 1.0, "unbounded"),
        Param("flag", "bool", False, "on or off"),
        Param("label", "str", "x", "free text"),
        Param("mode", "choice", "fast", "how", choices=("fast", "Exact")),
        Param("bits", "choice", 8, "numeric choice", choices=(4, 8)),
        Param("rank", "rank", 0.5, "kept rank"),
        Param("target", "str", REQUIRED, "what to aim at"),
    )


@pytest.fixture(scope="module", autouse=True)
def registered() -> Iterator[None]:
    register(Knobs)
    yield
    registry_module._REGISTRY.pop(Knobs.name)


def make(**kwargs) -> Knobs:
    return Knobs(target="t", **kwargs)


# ---------------------------------------------------------------- values of every kind
@pytest.mark.parametrize(
    ("name", "given", "expected"),
    [
        ("count", 3, 3),
        ("count", "3", 3),
        ("count", " 7 ", 7),
        ("count", np.int64(4), 4),
        ("ratio", 0, 0.0),
        ("ratio", "0.25", 0.25),
        ("ratio", "2.5e-1", 0.25),
        ("ratio", np.float32(0.5), 0.5),
        ("scale", "-1E3", -1000.0),
        ("flag", True, True),
        ("flag", np.bool_(True), True),
        ("flag", "true", True),
        ("flag", "YES", True),
        ("flag", "1", True),
        ("flag", "False", False),
        ("flag", "no", False),
        ("flag", "0", False),
        ("label", "a b,c", "a b,c"),
        ("mode", "exact", "Exact"),
        ("mode", "FAST", "fast"),
        ("bits", "4", 4),
        ("bits", 4, 4),
        ("bits", np.int64(4), 4),
        ("rank", 1, 1),
        ("rank", 64, 64),
        ("rank", 1.0, 1.0),
        ("rank", 0.125, 0.125),
        ("rank", "0.125", 0.125),
        ("rank", "32", 32),
        ("rank", "25%", 0.25),
        ("rank", "1e-1", 0.1),
        ("layers", "conv*|op:Gemm|!#0", "conv*|op:Gemm|!#0"),
    ],
)
def test_valid_values(name, given, expected):
    value = make(**{name: given}).config[name]
    assert value == expected
    assert type(value) is type(expected)


def test_defaults_and_schema_order():
    p = make()
    assert list(p.config) == [
        "count",
        "ratio",
        "scale",
        "flag",
        "label",
        "mode",
        "bits",
        "rank",
        "target",
        "layers",
    ]
    assert p.config["layers"] == "*"
    assert p.config["count"] == 2
    # only non-default and required values are printed
    assert p.to_text() == "test_params_knobs(target=t)"
    assert make(count=3, bits=4, flag=True).to_text() == (
        "test_params_knobs(count=3,flag=true,bits=4,target=t)"
    )


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("name", "given", "fragment"),
    [
        ("count", 3.5, "parameter count must be an integer, got 3.5"),
        ("count", True, "parameter count must be an integer"),
        ("count", "3.5", "parameter count='3.5' is not a valid int"),
        ("count", "many", "parameter count='many' is not a valid int"),
        ("count", 0, "parameter count=0 is below its minimum 1"),
        ("count", "9", "parameter count=9 is above its maximum 8"),
        ("ratio", -0.1, "parameter ratio=-0.1 is below its minimum 0.0"),
        ("ratio", "1.5", "parameter ratio=1.5 is above its maximum 1.0"),
        ("ratio", "half", "parameter ratio='half' is not a valid float"),
        ("ratio", [0.5], "parameter ratio must be a number"),
        ("scale", float("nan"), "parameter scale must be finite"),
        ("scale", "inf", "parameter scale must be finite"),
        ("flag", 1, "parameter flag must be true or false, got 1"),
        ("flag", "maybe", "parameter flag='maybe' is not a valid bool"),
        ("label", 3, "parameter label must be a string, got 3"),
        ("mode", "slow", "parameter mode='slow' is not one of: fast, Exact"),
        ("mode", None, "parameter mode must be a string"),
        ("bits", 16, "parameter bits='16' is not one of: 4, 8"),
        ("rank", 0, "parameter rank=0: an integer rank must be >= 1"),
        ("rank", "0", "an integer rank must be >= 1"),
        ("rank", -2, "an integer rank must be >= 1"),
        ("rank", 0.0, "a fractional rank must be in (0, 1]"),
        ("rank", 1.5, "a fractional rank must be in (0, 1]"),
        ("rank", "150%", "a fractional rank must be in (0, 1]"),
        ("rank", True, "parameter rank must be a fraction in (0, 1] or an integer rank"),
        ("rank", "big", "parameter rank='big' is not a valid rank"),
        ("layers", "#3-1", "parameter layers='#3-1': layer selector range '#3-1' is empty"),
        ("layers", 3, "parameter layers must be a string"),
    ],
)
def test_bad_value_names_the_pass_and_the_parameter(name, given, fragment):
    with pytest.raises(ParameterError) as info:
        make(**{name: given})
    message = str(info.value)
    assert message.startswith("pass test_params_knobs: ")
    assert fragment in message
    # chained to the parameter's own error
    assert isinstance(info.value.__cause__, ParameterError)


def test_required_parameter():
    with pytest.raises(
        ParameterError, match="pass test_params_knobs needs parameter 'target': what to aim at"
    ):
        Knobs()
    with pytest.raises(ParameterError, match="needs parameter 'target'"):
        PassManager.from_text("test_params_knobs(count=2)")
    assert PassManager.from_text("test_params_knobs(target=a)").passes[0].config["target"] == "a"


@pytest.mark.parametrize(
    ("given", "suggestion"),
    [("cuont", "count"), ("Ratio", "ratio"), ("layer", "layers"), ("rnak", "rank")],
)
def test_unknown_parameter_suggests_the_close_name(given, suggestion):
    with pytest.raises(ParameterError) as info:
        make(**{given: 1})
    message = str(info.value)
    assert f"pass test_params_knobs has no parameter {given!r}" in message
    assert f"did you mean {suggestion!r}?" in message
    assert (
        "parameters: count, ratio, scale, flag, label, mode, bits, rank, target, layers" in message
    )


def test_unknown_parameter_without_a_close_name():
    with pytest.raises(ParameterError) as info:
        PassManager.from_text("test_params_knobs(target=a,zzzzzz=1)")
    assert "no parameter 'zzzzzz'" in str(info.value)
    assert "did you mean" not in str(info.value)


def test_pipeline_text_values_are_typed():
    p = PassManager.from_text(
        "test_params_knobs(count=4,ratio=1e-1,flag=yes,mode=EXACT,bits=4,rank=50%,target='a b')"
    ).passes[0]
    assert p.config == {
        "count": 4,
        "ratio": 0.1,
        "scale": 1.0,
        "flag": True,
        "label": "x",
        "mode": "Exact",
        "bits": 4,
        "rank": 0.5,
        "target": "a b",
        "layers": "*",
    }
    assert (
        p.to_text()
        == "test_params_knobs(count=4,ratio=0.1,flag=true,mode=Exact,bits=4,target='a b')"
    )


def test_passes_with_equal_config_are_equal():
    assert make(count=3) == make(count="3")
    assert hash(make(count=3)) == hash(make(count="3"))
    assert make(count=3) != make(count=4)
    assert repr(make(count=3)) == "<pass test_params_knobs(count=3,target=t)>"


# ---------------------------------------------------------------- help text
def test_describe_lines():
    schema = Knobs.schema()
    assert list(schema)[-1] == "layers"
    assert schema["count"].describe() == "count (int, in [1, 8], default 2): how many"
    assert schema["ratio"].describe() == "ratio (float, in [0.0, 1.0], default 0.5): a fraction"
    assert schema["scale"].describe() == "scale (float, default 1.0): unbounded"
    assert schema["flag"].describe() == "flag (bool, default false): on or off"
    assert schema["label"].describe() == "label (str, default x): free text"
    assert schema["mode"].describe() == "mode (fast|Exact, default fast): how"
    assert schema["bits"].describe() == "bits (4|8, default 8): numeric choice"
    assert schema["rank"].describe() == "rank (rank, default 0.5): kept rank"
    assert schema["target"].describe() == "target (str, required): what to aim at"
    assert schema["layers"].describe().startswith("layers (selector, default *): ")
    half_open = Param("n", "int", 1, "h", low=1)
    assert half_open.describe() == "n (int, in [1, inf], default 1): h"
    assert (
        Param("m", "float", 0.0, "h", high=0).describe()
        == "m (float, in [-inf, 0], default 0.0): h"
    )
    assert Param("s", "str", "", "empty").describe() == "s (str, default ''): empty"


def test_summary_is_the_first_docstring_line():
    assert Knobs.summary() == "Turns every knob (test only)."
    assert type("NoDoc", (Pass,), {"name": "nodoc"}).summary() == ""


def test_tailor_passes_prints_the_schema(capsys):
    assert main(["passes", "TEST_PARAMS_KNOBS"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "test_params_knobs (lossy): Turns every knob (test only)."
    for param in Knobs.schema().values():
        assert f"    {param.describe()}" in lines
    assert "A second paragraph that only `tailor passes knobs` shows." in out


def test_every_builtin_parameter_describes_and_round_trips_its_default():
    """The in-tree schemas are consistent: defaults are valid and print as pipeline text."""
    for cls in registry_module.available_passes().values():
        for param in cls.schema().values():
            assert param.describe().startswith(f"{param.name} (")
            assert param.help, f"{cls.name}.{param.name} has no help text"
            if not param.required:
                assert param.validate(param.default) == param.default, (cls.name, param.name)
                text = format_value(param.default)
                if param.kind in ("str", "selector", "choice"):
                    continue
                assert param.parse(text) == param.default, (cls.name, param.name)
