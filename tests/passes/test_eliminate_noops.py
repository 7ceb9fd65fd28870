"""Tests for eliminate_noops: each no-op kind, the graph-output cases, and what must stay."""

from __future__ import annotations

import numpy as np
import pytest

from tailor.passes import PassContext
from tailor.passes.eliminate_noops import EliminateNoops
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types, run_passes


def eliminate(model, **config):
    return EliminateNoops(**config).run(model.copy(), PassContext())


def check(model, expected_ops, outputs=("y",)):
    result = eliminate(model)
    out = result.model
    assert sorted(op_types(out)) == sorted(expected_ops), result.changes
    assert [t.name for t in out.outputs] == list(outputs)
    assert_equivalent(model, out)
    assert_valid(out)
    return result


def graph(opset: int, inputs: str, outputs: str, body: str, inits: str = "", weights=None):
    return make_model(
        f"""
        <ir_version: 9, opset_import: ["" : {opset}]>
        g ({inputs}) => ({outputs}) <{inits}> {{
          {body}
        }}
        """.replace("<>", ""),
        weights,
    )


def test_identity_chain_before_graph_output():
    model = graph(
        13, "float[N,4] x", "float[N,4] y", "r = Relu (x)\n i = Identity (r)\n y = Identity (i)"
    )
    result = check(model, ["Relu"])
    assert len(result.changes) == 2


def test_identity_from_graph_input_to_graph_output_stays():
    model = graph(13, "float[N,4] x", "float[N,4] y", "y = Identity (x)")
    result = eliminate(model)
    assert not result.modified
    assert "graph output" in result.layer_notes[model.nodes[0].name]["skipped"]["noop"]


def test_identity_between_two_graph_outputs_stays():
    model = graph(
        13, "float[N,4] x", "float[N,4] y, float[N,4] z", "y = Relu (x)\n z = Identity (y)"
    )
    assert not eliminate(model).modified


def test_identity_of_constant_to_graph_output_stays():
    model = graph(
        13,
        "float[N,4] x",
        "float[N,4] y, float[4] z",
        "y = Relu (x)\n z = Identity (k)",
        "float[4] k",
    )
    assert not eliminate(model).modified


def test_noop_from_input_to_output_becomes_identity():
    # The output keeps its own name, so a (cheaper) Identity has to stay.
    model = graph(
        13,
        "float[N,3,4] x",
        "float[N,3,4] y",
        "y = Reshape (x, s)",
        "int64[3] s",
        {"s": np.array([0, 3, 4])},
    )
    check(model, ["Identity"])


@pytest.mark.parametrize(
    ("opset", "body", "inits", "weights"),
    [
        (13, "d = Dropout (x)\n y = Relu (d)", "", None),
        (10, "d = Dropout <ratio=0.3> (x)\n y = Relu (d)", "", None),
        (13, "d, m = Dropout (x, r)\n y = Relu (d)", "float r", {"r": np.float32(0.2)}),
        (
            13,
            "d = Dropout (x, r, t)\n y = Relu (d)",
            "float r, bool t",
            {"r": np.float32(0.2), "t": np.bool_(False)},
        ),
    ],
)
def test_inference_dropout(opset, body, inits, weights):
    check(graph(opset, "float[N,4] x", "float[N,4] y", body, inits, weights), ["Relu"])


def test_dropout_with_used_mask_or_training_stays():
    model = graph(
        13, "float[N,4] x", "float[N,4] y, bool[N,4] m", "d, m = Dropout (x)\n y = Relu (d)"
    )
    assert not eliminate(model).modified
    model = graph(13, "float[N,4] x, bool t", "float[N,4] y", "d = Dropout (x, , t)\n y = Relu (d)")
    assert "training" in eliminate(model).layer_notes[model.nodes[0].name]["skipped"]["noop"]


@pytest.mark.parametrize(
    ("shape", "target", "noop"),
    [
        ("N,3,8,8", [0, 3, 8, 8], True),
        ("N,3,8,8", [-1, 3, 8, 8], True),
        ("N,3,8,8", [0, 3, -1, 8], True),
        ("N,3,8,8", [0, 0, 0, 0], True),
        ("2,3,4", [2, 3, 4], True),
        ("N,3,8,8", [0, 3, 64], False),
        ("N,3,8,8", [0, 8, 3, 8], False),
        ("N,3,8,8", [-1, 3, 8, -1], False),
    ],
)
def test_reshape(shape, target, noop):
    out = f"float[{shape.replace('3,8,8', '?,?,?') if not noop else shape}] y"
    model = graph(
        13,
        f"float[{shape}] x",
        f"float[{','.join('?' * len(target))}] y",
        "r = Reshape (x, s)\n y = Relu (r)",
        f"int64[{len(target)}] s",
        {"s": np.array(target)},
    )
    del out
    if noop:
        check(model, ["Relu"])
    else:
        assert not eliminate(model).modified


def test_reshape_allowzero_is_not_a_copy():
    model = graph(
        14,
        "float[2,3,4] x",
        "float[2,3,4] y",
        "r = Reshape <allowzero=1> (x, s)\n y = Relu (r)",
        "int64[3] s",
        {"s": np.array([2, 3, 4])},
    )
    # Statically equal shapes: a no-op whatever allowzero says.
    check(model, ["Relu"])
    model = graph(
        14,
        "float[N,3,4] x",
        "float[N,3,4] y",
        "r = Reshape <allowzero=1> (x, s)\n y = Relu (r)",
        "int64[3] s",
        {"s": np.array([0, 3, 4])},
    )
    assert not eliminate(model).modified


def test_transposes():
    body = "a = Transpose <perm=[0,1,2,3]> (x)\n b = Transpose <perm=[0,2,3,1]> (a)\n c = Transpose <perm=[0,3,1,2]> (b)\n y = Relu (c)"
    result = check(graph(13, "float[N,3,4,5] x", "float[N,3,4,5] y", body), ["Relu"])
    assert any("inverse" in line for line in result.changes)


def test_transpose_pair_whose_inner_result_is_also_used():
    body = "b = Transpose <perm=[0,2,3,1]> (x)\n c = Transpose <perm=[0,3,1,2]> (b)\n y = Relu (c)\n z = Relu (b)"
    check(
        graph(13, "float[N,3,4,5] x", "float[N,3,4,5] y, float[N,4,5,3] z", body),
        ["Transpose", "Relu", "Relu"],
        ("y", "z"),
    )


def test_transposes_that_do_not_cancel_stay():
    body = "b = Transpose <perm=[0,2,3,1]> (x)\n c = Transpose <perm=[0,2,3,1]> (b)\n y = Relu (c)"
    assert not eliminate(graph(13, "float[N,3,4,5] x", "float[?,?,?,?] y", body)).modified
    body = "b = Transpose (x)\n y = Relu (b)"  # default perm reverses
    assert not eliminate(graph(13, "float[N,3,4,5] x", "float[?,?,?,?] y", body)).modified


def test_cast_and_pad():
    body = "c = Cast <to=1> (x)\n p = Pad (c, pads)\n y = Relu (p)\n i = Cast <to=7> (x)\n z = Cast <to=7> (i)"
    model = graph(
        13,
        "float[N,4] x",
        "float[N,4] y, int64[N,4] z",
        body,
        "int64[4] pads",
        {"pads": np.zeros(4, np.int64)},
    )
    check(model, ["Relu", "Cast"], ("y", "z"))


def test_non_zero_pad_and_changing_cast_stay():
    body = "c = Cast <to=7> (x)\n p = Pad (x, pads)\n y = Relu (p)"
    model = graph(
        13,
        "float[N,4] x",
        "float[N,5] y, int64[N,4] c",
        body,
        "int64[4] pads",
        {"pads": np.array([0, 1, 0, 0])},
    )
    assert not eliminate(model).modified


def test_flatten_and_squeeze():
    body = "f = Flatten (x)\n s = Squeeze (f)\n y = Relu (s)"
    check(graph(13, "float[2,4] x", "float[2,4] y", body), ["Relu"])
    body = "f = Flatten <axis=-1> (x)\n y = Relu (f)"
    check(graph(13, "float[N,4] x", "float[N,4] y", body), ["Relu"])
    # N may be 1 at run time, and Flatten of rank 3 merges axes
    assert not eliminate(
        graph(13, "float[N,4] x", "float[?,?] y", "s = Squeeze (x)\n y = Relu (s)")
    ).modified
    assert not eliminate(
        graph(13, "float[N,2,2] x", "float[N,4] y", "s = Flatten (x)\n y = Relu (s)")
    ).modified


@pytest.mark.parametrize(
    ("opset", "body", "inits", "weights", "shape"),
    [
        (
            13,
            "u = Unsqueeze (x, a)\n s = Squeeze (u, a)\n y = Relu (s)",
            "int64[1] a",
            {"a": np.array([1])},
            "N,3",
        ),
        (
            13,
            "s = Squeeze (x, a)\n u = Unsqueeze (s, a)\n y = Relu (u)",
            "int64[1] a",
            {"a": np.array([-1])},
            "N,3,1",
        ),
        (
            11,
            "u = Unsqueeze <axes=[0,2]> (x)\n s = Squeeze <axes=[0,-2]> (u)\n y = Relu (s)",
            "",
            None,
            "N,3",
        ),
    ],
)
def test_squeeze_unsqueeze_pairs(opset, body, inits, weights, shape):
    check(graph(opset, f"float[{shape}] x", f"float[{shape}] y", body, inits, weights), ["Relu"])


def test_mismatched_squeeze_unsqueeze_stay():
    body = "u = Unsqueeze (x, a)\n s = Squeeze (u, b)\n y = Relu (s)"
    model = graph(
        13,
        "float[N,3] x",
        "float[?,?] y",
        body,
        "int64[1] a, int64[1] b",
        {"a": np.array([1]), "b": np.array([0])},
    )
    # Squeeze on axis 0 (N) is invalid at run time for N != 1, so only structure is checked.
    assert not eliminate(model).modified


def test_everything_through_pass_manager():
    body = (
        "i = Identity (x)\n d = Dropout (i)\n r = Reshape (d, s)\n t1 = Transpose <perm=[0,2,3,1]> (r)\n"
        " t2 = Transpose <perm=[0,3,1,2]> (t1)\n c = Conv (t2, w)\n y = Identity (c)"
    )
    model = graph(
        13,
        "float[N,3,8,8] x",
        "float[N,4,8,8] y",
        body,
        "int64[4] s, float[4,3,1,1] w",
        {"s": np.array([0, 3, 8, 8])},
    )
    out = run_passes(model, "eliminate_noops")
    assert op_types(out) == ["Conv"]
    assert [t.name for t in out.outputs] == ["y"]
    assert_equivalent(model, out)
    assert_valid(out)


def test_single_input_variadic_ops():
    body = "c = Concat <axis=1> (x)\n s = Sum (c)\n m = Max (s)\n y = Relu (m)"
    check(graph(13, "float[N,4] x", "float[N,4] y", body), ["Relu"])


def test_variadic_ops_with_two_inputs_stay():
    body = "c = Concat <axis=1> (x, x)\n s = Sum (x, x)\n y = Relu (c)\n z = Relu (s)"
    model = graph(13, "float[N,4] x", "float[N,8] y, float[N,4] z", body)
    assert not eliminate(model).modified
