"""Tests for pipeline text: parse/print round trip, canonical text, syntax and name errors."""

from __future__ import annotations

import re
import string
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailor.errors import PipelineSyntaxError, UnknownPassError
from tailor.passes import REQUIRED, Param, Pass, PassManager, register
from tailor.passes import registry as registry_module
from tailor.passes.base import format_value
from tailor.passes.pipeline import PassCall, Pipeline, parse_pipeline

# ---------------------------------------------------------------- strategies
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,12}", fullmatch=True)

ints = st.integers(min_value=-(10**12), max_value=10**12).map(format_value)
floats = st.floats(allow_nan=False, allow_infinity=False).map(format_value)
exponent_floats = st.sampled_from(
    [1e-5, 2.5e-12, 1e16, -3e22, 6.02e23, 1.5e300, 5e-324, 0.1, -0.0]
).map(format_value)
bools = st.booleans().map(format_value)
# Any string at all: the printer must quote whatever the bare syntax cannot hold.
texts = st.text(max_size=12)
tricky_texts = st.text(alphabet=" ,()='\"\\\t\n\r\x0b\x0c\xa0\u2003x", max_size=8)
selector_terms = st.one_of(
    st.sampled_from(["*", "conv*", "op:Conv", "op:Conv*", "#1-3", "#0", "#4-", "layer?.w"]),
    st.from_regex(r"[a-z_]{1,6}\*?", fullmatch=True),
)
selectors = st.lists(
    st.tuples(st.booleans(), selector_terms).map(lambda t: ("!" if t[0] else "") + t[1]),
    min_size=1,
    max_size=4,
).map("|".join)
values = st.one_of(ints, floats, exponent_floats, bools, texts, tricky_texts, selectors)


@st.composite
def pass_calls(draw: st.DrawFn) -> PassCall:
    keys = draw(st.lists(names, max_size=4, unique=True))
    return PassCall(draw(names), tuple((k, draw(values)) for k in keys))


pipelines = st.lists(pass_calls(), min_size=1, max_size=5).map(lambda c: Pipeline(tuple(c)))


@settings(max_examples=150, deadline=None)
@given(pipelines)
def test_round_trip(pipeline):
    text = pipeline.to_text()
    assert parse_pipeline(text) == pipeline
    # printing is canonical: the text of the parsed tree is the same text
    assert parse_pipeline(text).to_text() == text


@settings(max_examples=50, deadline=None)
@given(pipelines, st.sampled_from([" ", "  ", "\t", "\n "]))
def test_whitespace_between_tokens_does_not_matter(pipeline, ws):
    parts = []
    for call in pipeline.calls:
        args = f"{ws},{ws}".join(f"{k}{ws}={ws}{format_value(v)}" for k, v in call.args)
        parts.append(f"{call.name}{ws}({ws}{args}{ws})" if call.args else call.name)
    text = ws + f"{ws},{ws}".join(parts) + ws
    assert parse_pipeline(text) == pipeline


# ---------------------------------------------------------------- typed round trip
class _AllKinds(Pass):
    """Does nothing; has one parameter of every kind (test only)."""

    name = "test_pipeline_all_kinds"
    params = (
        Param("count", "int", 1, "an int"),
        Param("ratio", "float", 0.5, "a float"),
        Param("flag", "bool", False, "a bool"),
        Param("label", "str", "", "a string"),
        Param("mode", "choice", "fast", "a choice", choices=("fast", "Exact")),
        Param("rank", "rank", 0.5, "a rank"),
        Param("must", "int", REQUIRED, "a required int"),
    )


@pytest.fixture(scope="module")
def all_kinds() -> Iterator[type[Pass]]:
    register(_AllKinds)
    yield _AllKinds
    registry_module._REGISTRY.pop(_AllKinds.name)


typed_configs = st.fixed_dictionaries(
    {"must": st.integers(-(10**6), 10**6)},
    optional={
        "count": st.integers(-(10**15), 10**15),
        "ratio": st.floats(allow_nan=False, allow_infinity=False),
        "flag": st.booleans(),
        "label": st.text(max_size=10),
        "mode": st.sampled_from(["fast", "Exact", "EXACT"]),
        "rank": st.one_of(
            st.integers(1, 4096), st.floats(min_value=1e-9, max_value=1.0, exclude_min=True)
        ),
        "layers": selectors,
    },
)


@settings(max_examples=100, deadline=None)
@given(config=typed_configs)
def test_typed_round_trip_through_pass_manager(all_kinds, config):
    original = all_kinds(**config)
    text = original.to_text()
    rebuilt = PassManager.from_text(text).passes[0]
    assert rebuilt == original
    assert rebuilt.config == original.config
    assert rebuilt.to_text() == text


# ---------------------------------------------------------------- canonical text
@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("fuse", "fuse"),
        ("  fuse ,  svd ( rank = 0.25 ) ", "fuse,svd(rank=0.25)"),
        ('svd(rank="0.25")', "svd(rank=0.25)"),
        ("x(layers='conv*|op:Conv')", "x(layers=conv*|op:Conv)"),
        ("x(layers='a b')", "x(layers='a b')"),
        ('x(s="it\'s")', "x(s='it\\'s')"),
        ("x(s='')", "x(s='')"),
        ("x()", "x"),
        ("x(v=1e-05,w=-2.5E+3,z=!#1-3)", "x(v=1e-05,w=-2.5E+3,z=!#1-3)"),
    ],
)
def test_canonical_text(text, canonical):
    assert parse_pipeline(text).to_text() == canonical
    assert str(parse_pipeline(text)) == canonical


def test_parse_tree():
    p = parse_pipeline("fuse,prune_channels(ratio=0.3,layers=conv*),svd(rank=0.25)")
    assert p.calls == (
        PassCall("fuse"),
        PassCall("prune_channels", (("ratio", "0.3"), ("layers", "conv*"))),
        PassCall("svd", (("rank", "0.25"),)),
    )


def test_pass_manager_text_is_canonical_and_case_insensitive():
    pm = PassManager.from_text("FUSE, Fold_BatchNorm(layers='conv*'), ELIMINATE_dead")
    assert [p.name for p in pm.passes] == ["fuse", "fold_batchnorm", "eliminate_dead"]
    assert pm.to_text() == "fuse,fold_batchnorm(layers=conv*),eliminate_dead"
    # defaults are omitted: the canonical text is the shortest one that reproduces the run
    assert PassManager.from_text("fuse(layers=*)").to_text() == "fuse"
    assert PassManager.from_text(pm.to_text()).passes == pm.passes


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("text", "column", "what"),
    [
        ("svd(rank=0.25", 14, "expected ')', found end of text"),
        ("svd(rank=0.25))", 15, "unexpected ')'"),
        ("fuse)", 5, "unexpected ')'"),
        ("fuse,", 6, "expected a pass name, found end of text"),
        ("fuse,,svd", 6, "expected a pass name, found ','"),
        ("svd(rank=0.25,)", 15, "expected a parameter name, found ')'"),
        ("svd(rank=)", 10, "expected a value"),
        ("svd(rank=,x=1)", 10, "expected a value"),
        ("svd(rank)", 9, "expected '=', found ')'"),
        ("svd(rank=1 2)", 12, "expected ')', found '2'"),
        ("svd(rank=a=b)", 11, "expected ')', found '='"),
        ("svd(rank='0.25)", 16, "unterminated quoted value"),
        ("fuse;svd", 5, "unexpected ';'"),
        ("fuse svd", 6, "unexpected 's'"),
        ("1fuse", 1, "expected a pass name, found '1'"),
        ("svd(=1)", 5, "expected a parameter name, found '='"),
        ("svd(rank=1,rank=2)", 16, "parameter 'rank' given twice"),
    ],
)
def test_syntax_error_points_at_the_column(text, column, what):
    with pytest.raises(PipelineSyntaxError) as info:
        parse_pipeline(text)
    message = str(info.value)
    assert what in message
    assert message.endswith(f"at column {column}")
    assert repr(text) in message


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_pipeline(text):
    with pytest.raises(PipelineSyntaxError, match="empty"):
        parse_pipeline(text)


def test_syntax_error_through_pass_manager():
    with pytest.raises(PipelineSyntaxError, match="column 5"):
        PassManager.from_text("fuse)")


def test_unknown_pass_suggests_a_name():
    with pytest.raises(
        UnknownPassError, match=r"unknown pass 'fold_batchnrom'; did you mean fold_batchnorm"
    ):
        PassManager.from_text("fuse,fold_batchnrom")
    with pytest.raises(UnknownPassError, match="did you mean fuse"):
        PassManager.from_text("FUSEE")


def test_unknown_pass_without_close_match_lists_the_passes():
    with pytest.raises(UnknownPassError) as info:
        PassManager.from_text("qqqqqqqqqq")
    assert "known passes:" in str(info.value)
    assert "fuse" in str(info.value)


def test_bare_value_characters():
    """Every character the printer leaves bare is one the parser reads as part of a value."""
    bare = re.compile(r"[^,()='\"\s]+")
    for c in string.printable + "\xa0\u2003\u3000\x85":
        text = format_value(f"a{c}b")
        if not text.startswith("'"):
            assert bare.fullmatch(text), repr(c)
        assert parse_pipeline(f"x(k={text})").calls[0].args == (("k", f"a{c}b"),)
