"""Tests for eliminate_dead: unused nodes and initializers go, inputs, outputs and subgraph reads stay."""

from __future__ import annotations

from tailor.passes import PassContext
from tailor.passes.eliminate_dead import EliminateDead
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types, run_passes

DEAD_BRANCH = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,4] x, float[N,4] unused) => (float[N,4] y, float[N,4] x2) <float[4] k, float[4] dead_k> {
  y = Add (x, k)
  s = Sigmoid (x)
  n = Mul (s, dead_k)
  x2 = Identity (x)
}
"""


def eliminate(model, **config):
    return EliminateDead(**config).run(model.copy(), PassContext())


def test_dead_branch_and_its_initializer_go():
    model = make_model(DEAD_BRANCH)
    result = eliminate(model)
    out = result.model
    assert sorted(op_types(out)) == ["Add", "Identity"]
    assert [t.name for t in out.inputs] == ["x", "unused"]  # graph inputs are never removed
    assert [t.name for t in out.outputs] == ["y", "x2"]
    assert "removed unused initializer dead_k" in result.changes
    assert len(result.changes) == 3
    assert_equivalent(model, out)
    assert_valid(out)


def test_through_pass_manager_and_nothing_to_do():
    model = make_model(DEAD_BRANCH)
    out = run_passes(model, "eliminate_dead")
    assert sorted(op_types(out)) == ["Add", "Identity"]
    assert not eliminate(out).modified


def test_selector_keeps_unselected_dead_nodes_and_what_they_read():
    model = make_model(DEAD_BRANCH)
    out = eliminate(model, layers="!op:Sigmoid").model
    # Mul is dead and selected, but the Sigmoid stays (not selected): it has nothing to feed.
    assert sorted(op_types(out)) == ["Add", "Identity", "Sigmoid"]
    out = eliminate(model, layers="!op:Mul").model
    # The Mul stays, so the Sigmoid it reads stays too.
    assert sorted(op_types(out)) == ["Add", "Identity", "Mul", "Sigmoid"]
    assert_valid(out)


def test_tensors_read_inside_subgraphs_are_live():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4] x, bool c) => (float[N,4] y) {
          t = Relu (x)
          u = Sigmoid (x)
          y = If (c) <
            then_branch = then_g () => (float[N,4] a) { a = Identity (t) },
            else_branch = else_g () => (float[N,4] b) { b = Neg (t) }
          >
        }
        """
    )
    out = eliminate(model).model
    assert sorted(op_types(out)) == ["If", "Relu"]
    assert_valid(out)
