"""Tests for PassManager: order, copies, records, and pre/post-condition checks that name
which pass failed after which."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from tailor.errors import ParameterError, PassError, VerificationError
from tailor.ir.model import Model
from tailor.passes import (
    Param,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    PipelineResult,
    check_model,
    register,
)
from tailor.passes import registry as registry_module
from tests.helpers import assert_equivalent, assert_valid, make_model, op_types

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[4,3,3,3] w, float[4] b> {
  [conv] c = Conv <pads=[1,1,1,1]> (x, w, b)
  [relu] y = Relu (c)
}
"""


def _weight(model: Model) -> gs.Constant:
    return model.node("conv").inputs[1]


class Scale(Pass):
    """Multiplies the conv weight by `factor` in place (test only)."""

    name = "test_manager_scale"
    params = (Param("factor", "float", 2.0, "multiplier"),)

    def run(self, model: Model, context: PassContext) -> PassResult:
        context.extra.setdefault("order", []).append(self.to_text())
        w = _weight(model)
        w.values *= np.float32(self.config["factor"])  # in place: must not reach the caller
        return PassResult(
            model, True, [f"scaled {w.name}"], {"conv": {"factor": self.config["factor"]}}
        )


class BrokenLossless(Scale):
    """Claims to be lossless but changes the numbers (test only)."""

    name = "test_manager_broken_lossless"
    lossless = True


class SwapRelu(Pass):
    """Replaces Relu by Identity-then-Relu: changes the graph, not the numbers (test only)."""

    name = "test_manager_swap"
    lossless = True

    def run(self, model: Model, context: PassContext) -> PassResult:
        context.extra.setdefault("order", []).append(self.name)
        relu = model.node("relu")
        mid = gs.Variable(model.unique_name("mid"), dtype=np.float32)
        model.add_node("Identity", [relu.inputs[0]], name="ident", outputs=[mid])
        relu.inputs[0] = mid
        model.toposort()
        return PassResult(model, True, ["inserted ident"])


class Untouched(Pass):
    """Changes nothing (test only)."""

    name = "test_manager_nothing"
    lossless = True

    def run(self, model: Model, context: PassContext) -> PassResult:
        context.extra.setdefault("order", []).append(self.name)
        return PassResult(model, False)


class InvalidGraph(Pass):
    """Adds a node of an operator that does not exist (test only)."""

    name = "test_manager_invalid"

    def run(self, model: Model, context: PassContext) -> PassResult:
        relu = model.node("relu")
        mid = gs.Variable(model.unique_name("mid"), dtype=np.float32)
        model.add_node("NoSuchOp", [relu.inputs[0]], name="bad", outputs=[mid])
        relu.inputs[0] = mid
        model.toposort()
        return PassResult(model, True, ["added bad"])


class Fails(Pass):
    """Raises a PassError naming a layer (test only)."""

    name = "test_manager_fails"

    def run(self, model: Model, context: PassContext) -> PassResult:
        _weight(model).values[...] = 0  # a half-done change that must not leak
        raise PassError("layer conv: the weight is not what I expected")


class Crashes(Pass):
    """Has a bug (test only)."""

    name = "test_manager_crashes"

    def run(self, model: Model, context: PassContext) -> PassResult:
        return {}["missing"]


TEST_PASSES = (Scale, BrokenLossless, SwapRelu, Untouched, InvalidGraph, Fails, Crashes)


@pytest.fixture(scope="module", autouse=True)
def registered() -> Iterator[None]:
    for cls in TEST_PASSES:
        register(cls)
    yield
    for cls in TEST_PASSES:
        registry_module._REGISTRY.pop(cls.name)


@pytest.fixture
def model() -> Model:
    return make_model(TEXT)


def run(model: Model, text: str, **ctx) -> tuple[PipelineResult, PassContext]:
    context = PassContext(**ctx)
    return PassManager.from_text(text).run(model, context), context


# ---------------------------------------------------------------- order, copies, records
def test_runs_in_order_on_copies(model):
    before = _weight(model).values.copy()
    result, ctx = run(
        model,
        "test_manager_scale(factor=3),test_manager_swap,test_manager_nothing,test_manager_scale",
    )
    assert ctx.extra["order"] == [
        "test_manager_scale(factor=3.0)",
        "test_manager_swap",
        "test_manager_nothing",
        "test_manager_scale",
    ]
    # the input model is untouched; the result has both scalings and the Identity
    np.testing.assert_array_equal(_weight(model).values, before)
    assert op_types(model) == ["Conv", "Relu"]
    assert result.model is not model
    np.testing.assert_allclose(_weight(result.model).values, before * 6, rtol=1e-6)
    assert op_types(result.model) == ["Conv", "Identity", "Relu"]
    assert [t.name for t in result.model.outputs] == ["y"]
    assert_valid(result.model)


def test_records(model):
    result, _ = run(model, "test_manager_swap,test_manager_nothing,test_manager_scale(factor=0.5)")
    assert (
        result.pipeline == "test_manager_swap,test_manager_nothing,test_manager_scale(factor=0.5)"
    )
    assert result.modified
    swap, nothing, scale = result.records
    assert (swap.text, swap.modified, swap.changes) == (
        "test_manager_swap",
        True,
        ["inserted ident"],
    )
    # a lossless pass that changed the graph gets a numeric check, with its figures
    assert swap.check.startswith("max abs error 0")
    assert (nothing.text, nothing.modified, nothing.changes, nothing.check) == (
        "test_manager_nothing",
        False,
        [],
        "",
    )
    assert scale.modified and scale.changes == ["scaled w"]
    assert scale.layer_notes == {"conv": {"factor": 0.5}}
    assert scale.check == ""  # lossy: structure is checked, numbers are not
    assert all(r.seconds >= 0 for r in result.records)


def test_nothing_changed(model):
    result, _ = run(model, "test_manager_nothing")
    assert not result.modified
    assert_equivalent(model, result.model, rtol=0)


def test_progress_callback(model):
    seen = []
    run(model, "test_manager_nothing,test_manager_swap", progress=lambda *a: seen.append(a))
    assert seen == [("test_manager_nothing", 0, 2), ("test_manager_swap", 1, 2)]


def test_pass_instances_and_text_agree(model):
    pm = PassManager([Scale(factor=3), Untouched()])
    assert pm.to_text() == "test_manager_scale(factor=3.0),test_manager_nothing"
    assert PassManager.from_text(pm.to_text()).passes == pm.passes


def test_bad_parameter_is_refused_before_anything_runs(model):
    with pytest.raises(ParameterError, match="pass test_manager_scale: parameter factor='x'"):
        PassManager.from_text("test_manager_nothing,test_manager_scale(factor=x)")


# ---------------------------------------------------------------- verification
def test_broken_lossless_pass_is_caught(model):
    with pytest.raises(VerificationError) as info:
        run(model, "test_manager_swap,test_manager_nothing,test_manager_broken_lossless")
    message = str(info.value)
    assert message.startswith(
        "pass 3 'test_manager_broken_lossless' (after test_manager_swap, test_manager_nothing) "
        "produced a bad model: outputs changed (max abs error "
    )
    assert "tolerance rtol=1e-05, atol=1e-05" in message


def test_broken_lossless_first_pass_has_no_after(model):
    with pytest.raises(
        VerificationError, match=r"^pass 1 'test_manager_broken_lossless\(factor=3.0\)' produced"
    ):
        run(model, "test_manager_broken_lossless(factor=3)")


def test_tolerance_and_check_level_are_honoured(model):
    # a tiny change within the tolerance passes
    result, _ = run(model, "test_manager_broken_lossless(factor=1.000001)")
    assert result.records[0].check.startswith("max abs error")
    # with checks off, or only the structural check, the numbers are not compared
    for check in ("none", "basic"):
        result, _ = run(model, "test_manager_broken_lossless", check=check)
        assert result.records[0].check == ""
        assert result.modified


def test_verification_uses_calibration_data(model):
    """With calibration data the numeric check runs on it (first samples only)."""
    data = {"x": np.zeros((10, 3, 8, 8), np.float32)}
    # On zero input the conv output is its bias: scaling only the weight changes nothing.
    result, _ = run(model, "test_manager_broken_lossless", calibration=data)
    assert result.records[0].check == "max abs error 0, max relative error 0"


def test_verification_accepts_float64_data_and_extra_arrays(model):
    """API callers pass numpy's default float64 and arrays that are not inputs (labels)."""
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((6, 3, 8, 8)), "labels": np.arange(6)}
    result, _ = run(model, "test_manager_swap", calibration=data)
    assert result.records[0].check.startswith("max abs error 0")
    with pytest.raises(VerificationError, match="outputs changed"):
        run(model, "test_manager_broken_lossless", calibration=data)


def test_numeric_check_skipped_for_dynamic_shapes():
    dynamic = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,H,W] x) => (float[N,4,H,W] y) <float[4,3,3,3] w, float[4] b> {
          [conv] c = Conv <pads=[1,1,1,1]> (x, w, b)
          [relu] y = Relu (c)
        }
        """
    )
    result, _ = run(dynamic, "test_manager_swap")
    assert result.records[0].check == "numeric check skipped (dynamic input shapes)"


@pytest.mark.parametrize("check", ["full", "basic"])
def test_invalid_graph_is_caught_by_the_checker(model, check):
    with pytest.raises(VerificationError) as info:
        run(model, "test_manager_nothing,test_manager_invalid", check=check)
    message = str(info.value)
    assert message.startswith(
        "pass 2 'test_manager_invalid' (after test_manager_nothing) produced a bad model: "
        "the model is not valid ONNX: "
    )
    assert "NoSuchOp" in message


def test_invalid_input_model_is_refused():
    m = make_model(TEXT)
    relu = m.node("relu")
    relu.op = "NoSuchOp"
    with pytest.raises(VerificationError, match="the model is not valid ONNX"):
        check_model(m)
    with pytest.raises(VerificationError, match="not valid ONNX"):
        PassManager([Untouched()]).run(m)


# ---------------------------------------------------------------- errors inside passes
def test_pass_error_is_labelled(model):
    before = _weight(model).values.copy()
    with pytest.raises(PassError) as info:
        run(model, "test_manager_swap,test_manager_scale(factor=3),test_manager_fails")
    assert str(info.value) == (
        "pass 3 'test_manager_fails' (after test_manager_swap, test_manager_scale(factor=3.0)) "
        "failed: layer conv: the weight is not what I expected"
    )
    assert isinstance(info.value.__cause__, PassError)
    np.testing.assert_array_equal(_weight(model).values, before)  # nothing leaked


def test_internal_error_is_labelled_and_chained(model):
    with pytest.raises(PassError) as info:
        run(model, "test_manager_crashes")
    assert str(info.value) == (
        "pass 1 'test_manager_crashes' failed with an internal error (KeyError: 'missing')"
    )
    assert isinstance(info.value.__cause__, KeyError)


def test_other_tailor_errors_keep_their_type(model):
    class NeedsData(Pass):
        """Needs calibration data (test only)."""

        name = "test_manager_needs_data"

        def run(self, model: Model, context: PassContext) -> PassResult:
            context.require_calibration(self.name)
            return PassResult(model, False)

    with pytest.raises(
        PassError,
        match=r"^pass 2 'test_manager_needs_data' \(after test_manager_nothing\) failed: pass test_manager_needs_data needs calibration data",
    ):
        PassManager([Untouched(), NeedsData()]).run(model)

    class BadConfig(Pass):
        """Refuses its input (test only)."""

        name = "test_manager_bad_config"

        def run(self, model: Model, context: PassContext) -> PassResult:
            raise ParameterError("parameter x does not fit layer conv")

    with pytest.raises(
        ParameterError, match=r"^pass 1 'test_manager_bad_config' failed: parameter x"
    ):
        PassManager([BadConfig()]).run(model)
