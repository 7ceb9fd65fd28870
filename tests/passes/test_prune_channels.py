"""Tests for prune_channels: every coupling pattern of the dependency view on tiny graphs
(structure, then exactness when the removed channels carry nothing, then the checker),
the options and criteria, least-squares reconstruction, and the reference architectures.

Exactness trick: the channels a criterion will remove are given zero filters (or the
consumer reads them with zero weights), so the pruned model must match the original to
1e-5; any channel removed at the wrong position, in any tensor, breaks that.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tailor.errors import ParameterError, PassError
from tailor.ir import Model, compare, run_model
from tailor.ir.activations import capture
from tailor.ir.dependency import dependency_graph
from tailor.ir.layers import layer_weight, summarize
from tailor.passes import PassContext, PassManager
from tailor.passes._lstsq import conv_geometry, conv_patches, refit_linear
from tailor.passes.prune_channels import PruneChannels
from tests.helpers import (
    ARCHITECTURE_NAMES,
    assert_equivalent,
    assert_valid,
    make_model,
    op_types,
    run_passes,
)

HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'
RNG = np.random.default_rng(0)


def prune(model: Model, data=None, **config):
    return PruneChannels(**config).run(model.copy(), PassContext(calibration=data))


def weight(model: Model, layer: str) -> np.ndarray:
    return layer_weight(model, model.node(layer))[1]  # type: ignore[index]


def const(model: Model, node: str, index: int) -> np.ndarray:
    return model.constant_value(model.node(node).inputs[index])  # type: ignore[return-value]


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def zero_filters(w: np.ndarray, channels, axis: int = 0) -> np.ndarray:
    w = w.copy()
    index = [slice(None)] * w.ndim
    index[axis] = list(channels)
    w[tuple(index)] = 0.0
    return w


def bn(c: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "s": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "b": rng.standard_normal(c).astype(np.float32),
        "mu": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def kept(n: int, removed) -> list[int]:
    return [i for i in range(n) if i not in set(removed)]


# ---------------------------------------------------------------------- conv-bn-relu-conv
CONV_BN_CONV = (
    HEAD
    + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
    <float[8,3,3,3] w1, float[8] s, float[8] b, float[8] mu, float[8] var, float[4,8,1,1] w2> {
        a = Conv<pads=[1,1,1,1]>(x, w1)
        n = BatchNormalization(a, s, b, mu, var)
        r = Relu(n)
        y = Conv(r, w2)
    }"""
)


def conv_bn_conv(removed=(0, 1, 2, 3), zero_consumer: bool = True) -> Model:
    w1 = randn(8, 3, 3, 3)
    w1[list(removed)] *= 1e-3  # the l1 criterion removes these
    w2 = randn(4, 8, 1, 1, seed=2)
    if zero_consumer:
        w2 = zero_filters(w2, removed, axis=1)
    return make_model(CONV_BN_CONV, {"w1": w1, "w2": w2, **bn(8)})


def test_conv_bn_relu_conv_structure_and_exactness():
    removed = (1, 3, 4, 6)
    model = conv_bn_conv(removed)
    result = prune(model, ratio=0.5)
    out = result.model
    assert result.modified
    assert op_types(out) == op_types(model)
    keep = kept(8, removed)
    np.testing.assert_array_equal(weight(out, "Conv_0"), weight(model, "Conv_0")[keep])
    np.testing.assert_array_equal(weight(out, "Conv_1"), weight(model, "Conv_1")[:, keep])
    for i in range(1, 5):  # BatchNorm scale, shift, mean, var follow the channels
        np.testing.assert_array_equal(
            const(out, "BatchNormalization_0", i), const(model, "BatchNormalization_0", i)[keep]
        )
    assert out.shape(out.tensor("a")) == ["N", 4, 8, 8]
    assert [t.name for t in out.outputs] == ["y"] and out.shape(out.outputs[0])[0] == "N"
    notes = result.layer_notes
    assert notes["Conv_0"]["channels_before"] == 8 and notes["Conv_0"]["channels_after"] == 4
    assert (notes["Conv_0"]["params_before"], notes["Conv_0"]["params_after"]) == (216, 108)
    assert (notes["Conv_1"]["params_before"], notes["Conv_1"]["params_after"]) == (32, 16)
    assert 0 < notes["Conv_0"]["weight_rel_error"] < 1e-2
    assert notes["Conv_1"]["weight_rel_error"] == 0.0
    before, after = summarize(model), summarize(out)
    assert (before.macs, after.macs) == (8 * 64 * 27 + 4 * 64 * 8, 4 * 64 * 27 + 4 * 64 * 4)
    assert after.params == before.params - 108 - 16 - 4 * 4
    assert any("no calibration data" in line for line in result.changes)
    assert_equivalent(model, out)
    assert_valid(out)


def test_batchnorm_parameters_behind_identity_nodes_are_sliced():
    # Exporters route shared parameters through Identity: the BN's scale and mean here.
    text = CONV_BN_CONV.replace(
        "n = BatchNormalization(a, s, b, mu, var)",
        "si = Identity(s)\n        mi = Identity(mu)\n        n = BatchNormalization(a, si, b, mi, var)",
    )
    removed = (0, 2, 5, 7)
    model = conv_bn_conv(removed)
    model = make_model(
        text,
        {
            k: v
            for k, v in zip(
                ("w1", "w2"), (weight(model, "Conv_0"), weight(model, "Conv_1")), strict=True
            )
        }
        | bn(8),
    )
    result = prune(model, ratio=0.5)
    keep = kept(8, removed)
    bn_node = next(n for n in result.model.nodes if n.op == "BatchNormalization")
    np.testing.assert_array_equal(result.model.constant_value(bn_node.inputs[1]), bn(8)["s"][keep])
    np.testing.assert_array_equal(result.model.constant_value(bn_node.inputs[3]), bn(8)["mu"][keep])
    assert_equivalent(model, result.model)
    assert_valid(result.model)


def test_ratio_zero_leaves_the_model_unchanged():
    model = conv_bn_conv(zero_consumer=False)
    result = prune(model, ratio=0.0)
    assert not result.modified
    assert op_types(result.model) == op_types(model)
    assert_equivalent(model, result.model, rtol=1e-6)
    assert "nothing to remove" in result.layer_notes["Conv_0"]["skipped"]


def test_lossy_without_data_reports_weight_error():
    model = conv_bn_conv(zero_consumer=False)
    w1 = weight(model, "Conv_0").copy()
    w1[:4] = randn(4, 3, 3, 3, seed=5)  # make the removed filters matter
    model.node("Conv_0").inputs[1] = model.add_constant("w1b", w1)
    result = prune(model, ratio=0.5)
    assert result.layer_notes["Conv_0"]["weight_rel_error"] > 0.1
    assert result.layer_notes["Conv_1"]["weight_rel_error"] > 0.1
    assert compare(model, result.model).max_rel > 1e-3
    assert_valid(result.model)


def test_through_the_pass_manager_and_pipeline_text():
    model = conv_bn_conv()
    out = run_passes(model, "prune_channels(ratio=0.5,criterion=l2)")
    assert weight(out, "Conv_0").shape == (4, 3, 3, 3)
    manager = PassManager.from_text("prune_channels(ratio=0.25,round_to=2,reconstruct=false)")
    assert manager.to_text() == "prune_channels(ratio=0.25,round_to=2,reconstruct=false)"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"ratio": 1.0}, "below 1"),
        ({"ratio": -0.1}, "minimum"),
        ({}, "needs parameter 'ratio'"),
        ({"ratio": 0.5, "criterion": "random"}, "not one of"),
        ({"ratio": 0.5, "round_to": 0}, "minimum"),
    ],
)
def test_parameters_are_validated(config, message):
    with pytest.raises(ParameterError, match=message):
        PruneChannels(**config)


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("size", "ratio", "round_to", "min_channels", "keep"),
    [
        (16, 0.3, 1, 1, 12),  # ceil(16 * 0.7) = 12
        (16, 0.3, 4, 1, 12),
        (16, 0.5, 3, 1, 9),  # 8 rounded up to a multiple of 3
        (16, 0.3, 8, 1, 16),  # 11.2 rounds up to 16: nothing to remove
        (16, 0.9, 1, 5, 5),
        (16, 0.9, 4, 5, 8),  # min_channels 5 rounds up to 8
    ],
)
def test_round_to_and_min_channels(size, ratio, round_to, min_channels, keep):
    model = make_model(
        HEAD
        + f"""g (float[N,3,4,4] x) => (float[N,2,4,4] y) <float[{size},3,1,1] w1, float[2,{size},1,1] w2> {{
            a = Conv(x, w1)
            r = Relu(a)
            y = Conv(r, w2)
        }}"""
    )
    result = prune(model, ratio=ratio, round_to=round_to, min_channels=min_channels)
    assert weight(result.model, "Conv_0").shape[0] == keep
    assert result.modified == (keep < size)
    if keep == size:
        assert "nothing to remove" in result.layer_notes["Conv_0"]["skipped"]
    assert_valid(result.model)


# ---------------------------------------------------------------------- coupling patterns
def test_residual_add_with_three_producers():
    removed = (0, 2, 5, 7)
    w = {
        "w0": zero_filters(randn(8, 3, 3, 3), removed),
        "w1": zero_filters(randn(8, 8, 3, 3, seed=1), removed),
        "w2": zero_filters(randn(8, 8, 3, 3, seed=2), removed),
    }
    model = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
        <float[8,3,3,3] w0, float[8,8,3,3] w1, float[8,8,3,3] w2, float[4,8,1,1] w3> {
            a = Conv<pads=[1,1,1,1]>(x, w0)
            ar = Relu(a)
            b = Conv<pads=[1,1,1,1]>(ar, w1)
            s1 = Add(b, ar)
            s1r = Relu(s1)
            c = Conv<pads=[1,1,1,1]>(s1r, w2)
            s2 = Add(c, s1r)
            s2r = Relu(s2)
            y = Conv(s2r, w3)
        }""",
        w,
    )
    result = prune(model, ratio=0.5)
    out = result.model
    keep = kept(8, removed)
    for layer in ("Conv_0", "Conv_1", "Conv_2"):
        assert result.layer_notes[layer]["group"] == result.layer_notes["Conv_0"]["group"]
        assert weight(out, layer).shape[0] == 4
    np.testing.assert_array_equal(weight(out, "Conv_1"), weight(model, "Conv_1")[keep][:, keep])
    np.testing.assert_array_equal(weight(out, "Conv_3"), weight(model, "Conv_3")[:, keep])
    assert_equivalent(model, out)
    assert_valid(out)


def test_concat_removes_each_branch_at_its_own_positions():
    ra, rb = (1, 3, 5), (0, 3)
    model = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,5,8,8] y)
        <float[6,3,1,1] w1, float[4,3,3,3] w2, float[5,10,1,1] w3> {
            a = Conv(x, w1)
            b = Conv<pads=[1,1,1,1]>(x, w2)
            c = Concat<axis=1>(a, b)
            y = Conv(c, w3)
        }""",
        {"w1": zero_filters(randn(6, 3, 1, 1), ra), "w2": zero_filters(randn(4, 3, 3, 3), rb)},
    )
    out = prune(model, ratio=0.5).model
    columns = kept(6, ra) + [6 + i for i in kept(4, rb)]
    np.testing.assert_array_equal(weight(out, "Conv_2"), weight(model, "Conv_2")[:, columns])
    assert out.shape(out.tensor("c")) == ["N", 5, 8, 8]
    assert_equivalent(model, out)
    assert_valid(out)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_is_a_carrier(multiplier):
    removed = (0, 2)
    c, m = 4, multiplier
    dw_removed = [k * m + j for k in removed for j in range(m)]
    model = make_model(
        HEAD
        + f"""g (float[N,3,8,8] x) => (float[N,5,8,8] y)
        <float[{c},3,1,1] w1, float[{c * m},1,3,3] wd, float[{c * m}] bd, float[5,{c * m},1,1] w2> {{
            a = Conv(x, w1)
            d = Conv<group={c},pads=[1,1,1,1]>(a, wd, bd)
            y = Conv(d, w2)
        }}""",
        {
            "w1": zero_filters(randn(c, 3, 1, 1), removed),
            # the depthwise bias reaches the consumer: it reads those channels with zeros
            "w2": zero_filters(randn(5, c * m, 1, 1), dw_removed, axis=1),
        },
    )
    result = prune(model, ratio=0.5)
    out = result.model
    dw = out.node("Conv_1")
    assert dw.attrs["group"] == 2
    keep = kept(c * m, dw_removed)
    np.testing.assert_array_equal(weight(out, "Conv_1"), weight(model, "Conv_1")[keep])
    np.testing.assert_array_equal(const(out, "Conv_1", 2), const(model, "Conv_1", 2)[keep])
    assert "Conv_1" not in result.layer_notes  # a carrier, not a pruned layer
    assert_equivalent(model, out)
    assert_valid(out)


def test_conv_transpose_producer_and_consumer():
    removed = (1, 2)
    model = make_model(
        HEAD
        + """g (float[N,3,4,4] x) => (float[N,2,8,8] y)
        <float[4,3,1,1] w1, float[4,4,2,2] wt, float[4] bt, float[2,4,1,1] w3> {
            a = Conv(x, w1)
            t = ConvTranspose<strides=[2,2]>(a, wt, bt)
            y = Conv(t, w3)
        }""",
        {
            "w1": zero_filters(randn(4, 3, 1, 1), removed),
            "wt": zero_filters(randn(4, 4, 2, 2, seed=1), removed, axis=1),
            "bt": zero_filters(randn(4), removed),
        },
    )
    out = prune(model, ratio=0.5).model
    keep = kept(4, removed)
    np.testing.assert_array_equal(
        weight(out, "ConvTranspose_0"), weight(model, "ConvTranspose_0")[keep][:, keep]
    )
    assert weight(out, "Conv_1").shape == (2, 2, 1, 1)
    assert_equivalent(model, out)
    assert_valid(out)


def test_grouped_conv_loses_channels_evenly_per_block():
    in_removed = (1, 2, 5, 6)  # two per block of the grouped conv's input
    out_removed = (0, 3, 4, 7)  # two per block of its output
    model = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
        <float[8,3,1,1] w1, float[8,4,3,3] wg, float[4,8,1,1] w3> {
            a = Conv(x, w1)
            b = Conv<group=2,pads=[1,1,1,1]>(a, wg)
            y = Conv(b, w3)
        }""",
        {
            "w1": zero_filters(randn(8, 3, 1, 1), in_removed),
            "wg": zero_filters(randn(8, 4, 3, 3), out_removed),
        },
    )
    out = prune(model, ratio=0.5).model
    g = out.node("Conv_1")
    assert g.attrs["group"] == 2
    wg = weight(model, "Conv_1")
    expected = np.concatenate([wg[[1, 2]][:, [0, 3]], wg[[5, 6]][:, [0, 3]]])
    np.testing.assert_array_equal(weight(out, "Conv_1"), expected)
    assert_equivalent(model, out)
    assert_valid(out)


def test_grouped_conv_blocks_keep_the_rounding_divisible():
    model = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
        <float[8,3,1,1] w1, float[8,2,3,3] wg, float[4,8,1,1] w3> {
            a = Conv(x, w1)
            b = Conv<group=4,pads=[1,1,1,1]>(a, wg)
            y = Conv(b, w3)
        }"""
    )
    # 4 blocks of 2: ratio 0.3 keeps ceil(5.6 / 4) * 4 = 8 (nothing), ratio 0.5 keeps 4.
    assert not prune(model, ratio=0.3).modified
    out = prune(model, ratio=0.5).model
    assert weight(out, "Conv_1").shape == (4, 1, 3, 3)
    assert out.node("Conv_1").attrs["group"] == 4
    assert_valid(out)


SE = (
    HEAD
    + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
    <float[8,3,3,3] w1, float[2,8,1,1] wr, float[2] br, float[8,2,1,1] we, float[8] be, float[4,8,1,1] w3> {
        a = Conv<pads=[1,1,1,1]>(x, w1)
        p = GlobalAveragePool(a)
        r = Conv(p, wr, br)
        rr = Relu(r)
        e = Conv(rr, we, be)
        s = Sigmoid(e)
        m = Mul(a, s)
        y = Conv(m, w3)
    }"""
)


@pytest.mark.parametrize("selected", ["Conv_0", "Conv_2"])
def test_squeeze_excite_gate_follows_the_trunk(selected):
    removed = (2, 3, 6, 7)
    we = randn(8, 2, 1, 1, seed=3)
    we[list(removed)] *= 1e-3
    model = make_model(SE, {"w1": zero_filters(randn(8, 3, 3, 3), removed), "we": we})
    # Selecting either producer prunes the whole coupled group; the squeeze group is not selected.
    result = prune(model, ratio=0.5, layers=selected)
    out = result.model
    keep = kept(8, removed)
    np.testing.assert_array_equal(weight(out, "Conv_2"), we[keep])
    np.testing.assert_array_equal(const(out, "Conv_2", 2), const(model, "Conv_2", 2)[keep])
    np.testing.assert_array_equal(weight(out, "Conv_1"), weight(model, "Conv_1")[:, keep])
    assert weight(out, "Conv_1").shape[0] == 2  # the squeeze group is untouched
    assert_equivalent(model, out)
    assert_valid(out)


def test_flatten_into_gemm_removes_every_spatial_position():
    removed = (1, 4, 5)
    model = make_model(
        HEAD
        + """g (float[N,3,4,4] x) => (float[N,10] y) <float[6,3,3,3] w1, float[10,24] wf, float[10] bf> {
            a = Conv<strides=[2,2],pads=[1,1,1,1]>(x, w1)
            f = Flatten(a)
            y = Gemm<transB=1>(f, wf, bf)
        }""",
        {"w1": zero_filters(randn(6, 3, 3, 3), removed)},
    )
    out = prune(model, ratio=0.5).model
    columns = [c * 4 + i for c in kept(6, removed) for i in range(4)]
    np.testing.assert_array_equal(weight(out, "Gemm_0"), weight(model, "Gemm_0")[:, columns])
    assert out.shape(out.tensor("f")) == ["N", 12]
    assert_equivalent(model, out)
    assert_valid(out)


def test_mlp_of_gemms_and_matmul_with_a_bias_add():
    removed = list(range(0, 32, 2))
    model = make_model(
        HEAD
        + """g (float[N,16] x) => (float[N,4] y)
        <float[32,16] w1, float[32] b1, float[32,8] w2, float[8] b2, float[8,4] w3> {
            h = Gemm<transB=1>(x, w1, b1)
            r = Relu(h)
            h2 = MatMul(r, w2)
            hb = Add(h2, b2)
            r2 = Relu(hb)
            y = MatMul(r2, w3)
        }""",
        {
            "w1": zero_filters(randn(32, 16), removed),
            "b1": zero_filters(randn(32), removed),
            "w2": zero_filters(randn(32, 8), [0, 1, 2, 3], axis=1),
            "b2": zero_filters(randn(8), [0, 1, 2, 3]),
        },
    )
    out = prune(model, ratio=0.5).model
    assert weight(out, "Gemm_0").shape == (16, 16)
    assert weight(out, "MatMul_0").shape == (16, 4)
    np.testing.assert_array_equal(const(out, "Add_0", 1), const(model, "Add_0", 1)[4:])
    assert weight(out, "MatMul_1").shape == (4, 4)
    assert_equivalent(model, out)
    assert_valid(out)


def test_instancenorm_prelu_and_per_channel_constants_are_sliced():
    removed = (0, 1, 4, 5)
    w1 = randn(8, 3, 3, 3)
    w1[list(removed)] *= 1e-3
    model = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
        <float[8,3,3,3] w1, float[8] is, float[8] ib, float[8,1,1] slope, float[1,8,1,1] k, float[8,1,1] c, float[1] one, float[4,8,1,1] w2> {
            a = Conv<pads=[1,1,1,1]>(x, w1)
            n = InstanceNormalization(a, is, ib)
            p = PRelu(n, slope)
            m = Mul(p, k)
            q = Add(m, c)
            o = Add(q, one)
            y = Conv(o, w2)
        }""",
        {"w1": w1, "w2": zero_filters(randn(4, 8, 1, 1), removed, axis=1)},
    )
    out = prune(model, ratio=0.5).model
    keep = kept(8, removed)
    np.testing.assert_array_equal(
        const(out, "InstanceNormalization_0", 1), const(model, "InstanceNormalization_0", 1)[keep]
    )
    np.testing.assert_array_equal(const(out, "PRelu_0", 1), const(model, "PRelu_0", 1)[keep])
    np.testing.assert_array_equal(const(out, "Mul_0", 1), const(model, "Mul_0", 1)[:, keep])
    np.testing.assert_array_equal(const(out, "Add_0", 1), const(model, "Add_0", 1)[keep])
    assert const(out, "Add_1", 1).shape == (1,)  # a scalar broadcast stays
    assert_equivalent(model, out)
    assert_valid(out)


def test_reshape_constants_are_rewritten():
    removed = (0, 3, 5, 6)
    model = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
        <float[8,3,1,1] w1, int64[3] s3 = {0, 8, 64}, int64[4] s4 = {-1, 8, 8, 8}, float[4,8,1,1] w2> {
            a = Conv(x, w1)
            r = Reshape(a, s3)
            t = Softmax<axis=2>(r)
            back = Reshape(t, s4)
            y = Conv(back, w2)
        }""",
        {
            "w1": zero_filters(randn(8, 3, 1, 1), removed) + 0.0,
            "w2": zero_filters(randn(4, 8, 1, 1), removed, axis=1),
        },
    )
    w1 = weight(model, "Conv_0").copy()
    w1[list(removed)] = 1e-4  # softmax of a zero channel is not zero: the consumer ignores it
    model.node("Conv_0").inputs[1] = model.add_constant("w1b", w1)
    out = prune(model, ratio=0.5).model
    assert const(out, "Reshape_0", 1).tolist() == [0, 4, 64]
    assert const(out, "Reshape_1", 1).tolist() == [-1, 4, 8, 8]
    assert_equivalent(model, out)
    assert_valid(out)


RUNTIME_RESHAPE = (
    HEAD
    + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
    <float[8,3,1,1] w1, int64[1] zero = {0}, int64[1] one = {1}, int64[1] two = {2},
     int64[1] c8 = {8}, int64[1] c64 = {64}, int64[4] s4 = {-1, 8, 8, 8}, float[4,8,1,1] w2> {
        a = Conv(x, w1)
        sh = Shape(a)
        n = Slice(sh, zero, one)
        c = Slice(sh, one, two)
        full = Concat<axis=0>(n, CHANNELS, c64)
        r = Reshape(a, full)
        t = Softmax<axis=2>(r)
        back = Reshape(t, s4)
        y = Conv(back, w2)
    }"""
)


def test_shape_computed_at_run_time_follows_the_pruning():
    removed = (0, 3, 5, 6)
    w1 = randn(8, 3, 1, 1)
    w1[list(removed)] *= 1e-3
    model = make_model(
        RUNTIME_RESHAPE.replace("CHANNELS", "c"),
        {"w1": w1, "w2": zero_filters(randn(4, 8, 1, 1), removed, axis=1)},
    )
    result = prune(model, ratio=0.5)
    out = result.model
    assert result.modified and weight(out, "Conv_0").shape == (4, 3, 1, 1)
    assert const(out, "Reshape_1", 1).tolist() == [-1, 4, 8, 8]
    assert_equivalent(model, out)
    assert_valid(out)


def test_shape_hard_coding_the_channel_count_blocks_the_group():
    model = make_model(RUNTIME_RESHAPE.replace("CHANNELS", "c8"))
    result = prune(model, ratio=0.5)
    assert not result.modified
    assert "does not run" in result.layer_notes["Conv_0"]["skipped"]


def test_without_an_onnxruntime_run_inferred_shapes_are_checked():
    removed = (1, 3, 4, 6)
    model = make_model(
        HEAD
        + """g (float[N,3,8,8] x, float[N,T] z) => (float[N,4,8,8] y, float[N,T] zr)
        <float[8,3,3,3] w1, float[4,8,1,1] w2> {
            a = Conv<pads=[1,1,1,1]>(x, w1)
            r = Relu(a)
            y = Conv(r, w2)
            zr = Relu(z)
        }""",
        {"w1": zero_filters(randn(8, 3, 3, 3), removed)},
    )
    out = prune(model, ratio=0.5).model
    assert weight(out, "Conv_1").shape == (4, 4, 1, 1)
    feeds = {"x": randn(2, 3, 8, 8), "z": randn(2, 5)}
    assert_equivalent(model, out, inputs=feeds)
    assert_valid(out)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_sizes_are_rewritten(opset):
    if opset >= 18:
        split = "l, r = Split<axis=1, num_outputs=2>(a)"
        sizes, decl = (4, 4), ""
    elif opset >= 13:
        split, sizes, decl = "l, r = Split<axis=1>(a, sp)", (5, 3), ", int64[2] sp = {5, 3}"
    else:
        split, sizes, decl = "l, r = Split<axis=1, split=[5, 3]>(a)", (5, 3), ""
    model = make_model(
        f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
        + f"""g (float[N,3,8,8] x) => (float[N,2,8,8] y, float[N,2,8,8] z)
        <float[8,3,1,1] w1, float[2,{sizes[0]},1,1] w2, float[2,{sizes[1]},1,1] w3{decl}> {{
            a = Conv(x, w1)
            {split}
            y = Conv(l, w2)
            z = Conv(r, w3)
        }}"""
    )
    result = prune(model, ratio=0.5)
    out = result.model
    new = [(s + 1) // 2 for s in sizes]
    split_node = out.node("Split_0")
    got = split_node.attrs["split"] if opset < 13 else const(out, "Split_0", 1).tolist()
    assert list(got) == new
    assert "num_outputs" not in split_node.attrs
    assert weight(out, "Conv_1").shape == (2, new[0], 1, 1)
    assert_valid(out)
    compare(model, out)  # runs; the outputs differ (channels were removed)


def test_slice_and_gather_bounds_follow_the_channels():
    model = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,4,8,8] z)
        <float[8,3,1,1] w1, int64[1] st = {2}, int64[1] en = {8}, int64[1] ax = {1}, float[4,6,1,1] w2,
         float[8,3,1,1] w3, int64[6] idx = {7, 6, 5, 4, 3, 2}, float[4,6,1,1] w4> {
            a = Conv(x, w1)
            s = Slice(a, st, en, ax)
            y = Conv(s, w2)
            b = Conv(x, w3)
            g = Gather<axis=1>(b, idx)
            z = Conv(g, w4)
        }""",
        {
            "w1": zero_filters(randn(8, 3, 1, 1), [0, 3, 5, 7]),
            "w3": zero_filters(randn(8, 3, 1, 1, seed=1), [0, 2, 4, 5]),
        },
    )
    out = prune(model, ratio=0.5).model
    # Slice: channels 2..7 read (3 zero filters among them go), 0..1 unread (one goes).
    assert (const(out, "Slice_0", 1).tolist(), const(out, "Slice_0", 2).tolist()) == ([1], [4])
    # Gather reads 7..2 in reverse; 5, 4, 2 go and 0 or 1 (unread) goes.
    assert const(out, "Gather_0", 1).tolist() == [3, 2, 1]
    assert_equivalent(model, out)
    assert_valid(out)


# ---------------------------------------------------------------------- must not apply
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("a = Conv(x, w1)\n y = Relu(a)", "graph output"),
        ("a = Conv(x, w1)\n s = Softmax<axis=1>(a)\n y = Relu(s)", "combines channels"),
        ("a = Conv(x, w1)\n s = Add(a, x8)\n y = Relu(s)", "graph input"),
    ],
)
def test_fixed_groups_are_left_alone(body, reason):
    model = make_model(
        HEAD
        + f"""g (float[N,3,8,8] x, float[N,8,8,8] x8) => (float[N,8,8,8] y) <float[8,3,1,1] w1> {{
            {body}
        }}"""
    )
    result = prune(model, ratio=0.5)
    assert not result.modified
    assert op_types(result.model) == op_types(model)
    assert reason in result.layer_notes["Conv_0"]["skipped"]
    assert_equivalent(model, result.model, rtol=1e-6)


SHUFFLE = (
    HEAD
    + """g (float[N,3,8,8] x) => (float[N,8,8,8] y)
    <float[8,3,1,1] w1, int64[2] sp = {4, 4}, float[4,4,1,1] w2, float[8,8,1,1] w3,
     int64[5] s5 = {0, 2, 4, 8, 8}, int64[4] s4 = {0, 8, 8, 8}> {
        a = Conv(x, w1)
        l, r = Split<axis=1>(a, sp)
        rb = Conv(r, w2)
        c = Concat<axis=1>(l, rb)
        t5 = Reshape(c, s5)
        tt = Transpose<perm=[0,2,1,3,4]>(t5)
        sh = Reshape(tt, s4)
        y = Conv(sh, w3)
    }"""
)


def test_channel_shuffle_prunes_the_same_positions_from_both_halves():
    # Units 1 and 2 (channel j of the identity half with channel j of the branch) are
    # zero; of the channels the branch reads (4..7), 4 and 7 are.
    w1 = zero_filters(randn(8, 3, 1, 1), [1, 2, 4, 7])
    w2 = zero_filters(randn(4, 4, 1, 1, seed=1), [1, 2])
    model = make_model(SHUFFLE, {"w1": w1, "w2": w2})
    result = prune(model, ratio=0.5)
    out = result.model
    assert const(out, "Split_0", 1).tolist() == [2, 2]
    assert const(out, "Reshape_0", 1).tolist() == [0, 2, 2, 8, 8]
    assert const(out, "Reshape_1", 1).tolist() == [0, 4, 8, 8]
    np.testing.assert_array_equal(weight(out, "Conv_0"), w1[[0, 3, 5, 6]])
    np.testing.assert_array_equal(weight(out, "Conv_1"), w2[[0, 3]][:, [1, 2]])
    # After the shuffle, channel 2j is unit j of the identity half, 2j + 1 of the branch.
    np.testing.assert_array_equal(weight(out, "Conv_2"), weight(model, "Conv_2")[:, [0, 1, 6, 7]])
    assert_equivalent(model, out)
    assert_valid(out)


def test_channel_shuffle_with_one_half_fixed_is_skipped():
    model = make_model(SHUFFLE)
    # Only the branch is selected: the identity half keeps all its channels, and the
    # shuffle's [N, 2, C/2, H, W] reshape cannot lose positions from one row only.
    result = prune(model, ratio=0.5, layers="Conv_1")
    assert not result.modified
    assert "laid out with fixed ones" in result.layer_notes["Conv_1"]["skipped"]


# ---------------------------------------------------------------------- criteria
def criteria_model() -> Model:
    w1 = np.zeros((4, 3, 3, 3), np.float32)
    w1[0, 0, 0, 0] = 3.0  # l1 3, l2 3
    w1[1] = 0.2  # l1 5.4, l2 1.04
    w1[2] = randn(3, 3, 3) * 2  # large both ways
    w1[3, 0, 0, 0] = 0.5  # small both ways
    params = bn(4)
    params["s"] = np.array([1.0, 1.0, 0.01, 0.02], np.float32)
    return make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,2,8,8] y)
        <float[4,3,3,3] w1, float[4] s, float[4] b, float[4] mu, float[4] var, float[2,4,1,1] w2> {
            a = Conv<pads=[1,1,1,1]>(x, w1)
            n = BatchNormalization(a, s, b, mu, var)
            r = Relu(n)
            y = Conv(r, w2)
        }""",
        {"w1": w1, **params},
    )


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "activation", "apoz"])
def test_each_criterion_removes_its_least_important_channels(criterion):
    model = criteria_model()
    data = {"x": randn(16, 3, 8, 8, seed=4)}
    if criterion == "l1":
        expected = [0, 3]
    elif criterion == "l2":
        expected = [1, 3]
    elif criterion == "bn_scale":
        expected = [2, 3]
    else:
        r = capture(model, data, ["r"])["r"]
        if criterion == "activation":
            score = np.abs(r).mean(axis=(0, 2, 3))
        else:
            score = -(r <= 0).mean(axis=(0, 2, 3))
        expected = sorted(np.argsort(score, kind="stable")[:2].tolist())
    result = prune(
        model, data if criterion in ("activation", "apoz") else None, ratio=0.5, criterion=criterion
    )
    w = weight(result.model, "Conv_0")
    original = weight(model, "Conv_0")
    survivors = [i for i in range(4) if any(np.array_equal(w[j], original[i]) for j in range(2))]
    assert sorted(set(range(4)) - set(survivors)) == expected
    assert result.layer_notes["Conv_0"]["criterion"] == criterion
    assert_valid(result.model)


def test_bn_scale_without_batchnorm_falls_back_to_l1():
    model = make_model(
        HEAD
        + """g (float[N,3,4,4] x) => (float[N,2,4,4] y) <float[4,3,1,1] w1, float[2,4,1,1] w2> {
            a = Conv(x, w1)
            y = Conv(a, w2)
        }"""
    )
    result = prune(model, ratio=0.5, criterion="bn_scale")
    assert result.layer_notes["Conv_0"]["criterion"] == "l1"


def redundant_pair_model() -> Model:
    """Channel 3 repeats channel 0's filter (times 2, through a Relu): a re-fitted reader
    loses nothing without it, while the norm criteria keep it (the largest filter)."""
    w1 = randn(4, 3, 3, 3, seed=11)
    w1[1] *= 0.05  # smallest by norm, but carries its own information
    w1[3] = 2 * w1[0]
    return make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,5,8,8] y) <float[4,3,3,3] w1, float[5,4,1,1] w2> {
            a = Conv<pads=[1,1,1,1]>(x, w1)
            r = Relu(a)
            y = Conv(r, w2)
        }""",
        {"w1": w1, "w2": randn(5, 4, 1, 1, seed=12)},
    )


def test_refit_criterion_drops_the_channel_the_reader_can_make_up_for():
    model = redundant_pair_model()
    data = {"x": randn(32, 3, 8, 8, seed=13)}
    original = weight(model, "Conv_0")
    l1 = prune(model, data, ratio=0.25)
    w = weight(l1.model, "Conv_0")
    assert not any(np.array_equal(row, original[1]) for row in w)  # l1 drops the small one
    result = prune(model, data, ratio=0.25, criterion="refit")
    w = weight(result.model, "Conv_0")
    gone = [i for i in range(4) if not any(np.array_equal(row, original[i]) for row in w)]
    assert gone in ([0], [3])  # either half of the redundant pair
    assert result.layer_notes["Conv_0"]["criterion"] == "refit"
    # Nothing is lost: the re-fitted reader routes channel 0's share through its twin.
    assert result.layer_notes["Conv_1"]["rel_error"] < 1e-2
    held_out = {"x": randn(8, 3, 8, 8, seed=14)}
    assert output_error(model, result.model, held_out) < 1e-2
    assert output_error(model, l1.model, held_out) > 0.01
    assert_valid(result.model)


def test_refit_criterion_orders_by_elimination_cost():
    from tailor.passes._prune_select import elimination_scores, gather_normals

    model = redundant_pair_model()
    data = {"x": randn(32, 3, 8, 8, seed=13)}
    normals = gather_normals(model, ["Conv_1"], data, seed=0)
    assert set(normals) == {"Conv_1"} and normals["Conv_1"].gram.shape == (4, 4)
    group = next(g for g in dependency_graph(model).groups if "Conv_0" in g.producers)
    scores = elimination_scores(group, normals, drop=2)
    assert sorted(scores.argsort()[:1].tolist())[0] in (0, 3)
    assert sorted(scores[scores < 2].tolist()) == [0.0, 1.0] and (scores[scores >= 2] >= 2).all()
    assert elimination_scores(group, {}, drop=2) is None  # no modelled reader: caller uses l1


@pytest.mark.parametrize("criterion", ["activation", "apoz", "refit"])
def test_data_criteria_need_calibration_data(criterion):
    with pytest.raises(PassError, match="needs calibration data"):
        prune(criteria_model(), ratio=0.5, criterion=criterion)


# ---------------------------------------------------------------------- reconstruction
def test_conv_patches_match_onnxruntime():
    model = make_model(
        HEAD
        + """g (float[N,6,9,8] x) => (float[N,4,5,3] y) <float[4,3,3,2] w> {
            y = Conv<group=2,strides=[2,3],dilations=[1,2],pads=[1,0,1,1]>(x, w)
        }"""
    )
    x = randn(2, 6, 9, 8)
    y = run_model(model, {"x": x})["y"]
    w = weight(model, "Conv_0")
    attrs = model.node("Conv_0").attrs
    strides, dilations, begin, end, out_spatial = conv_geometry(attrs, x.shape[2:], w.shape[2:])
    assert out_spatial == [5, 3]
    positions = np.arange(2 * 5 * 3)
    patches = conv_patches(
        x, positions, kernel=w.shape[2:], strides=strides, dilations=dilations,
        pads_begin=begin, pads_end=end, out_spatial=out_spatial,
    )  # fmt: skip
    rows = np.moveaxis(y, 1, -1).reshape(-1, 4)
    for g in range(2):
        got = (
            patches[:, 3 * g : 3 * g + 3].reshape(len(positions), -1)
            @ w[2 * g : 2 * g + 2].reshape(2, -1).T
        )
        np.testing.assert_allclose(got, rows[:, 2 * g : 2 * g + 2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_geometry_auto_pad(auto_pad):
    size = 2 if auto_pad == "VALID" else 4
    model = make_model(
        HEAD
        + f"""g (float[N,2,7,7] x) => (float[N,3,{size},{size}] y) <float[3,2,4,4] w> {{
            y = Conv<auto_pad="{auto_pad}",strides=[2,2]>(x, w)
        }}"""
    )
    x = randn(1, 2, 7, 7)
    y = run_model(model, {"x": x})["y"]
    w = weight(model, "Conv_0")
    strides, dilations, begin, end, out_spatial = conv_geometry(
        model.node("Conv_0").attrs, (7, 7), (4, 4)
    )
    assert list(y.shape[2:]) == out_spatial
    patches = conv_patches(
        x, np.arange(y[0, 0].size), kernel=(4, 4), strides=strides, dilations=dilations,
        pads_begin=begin, pads_end=end, out_spatial=out_spatial,
    )  # fmt: skip
    got = patches.reshape(len(patches), -1) @ w.reshape(3, -1).T
    np.testing.assert_allclose(got, np.moveaxis(y[0], 0, -1).reshape(-1, 3), rtol=1e-4, atol=1e-5)


def test_refit_linear_recovers_a_linear_map_and_stays_near_w0_without_data():
    x = randn(500, 6)
    w = randn(6, 3, seed=1)
    y = x @ w + 0.5
    fitted, b = refit_linear(x, y, np.zeros((6, 3)), ridge=1e-8)
    np.testing.assert_allclose(fitted, w, atol=1e-4)
    np.testing.assert_allclose(b, 0.5, atol=1e-4)
    w0 = randn(6, 3, seed=2)
    near, _ = refit_linear(x[:2], y[:2], w0, ridge=1e3)
    assert np.linalg.norm(near - w0) < 0.1 * np.linalg.norm(w0)


def correlated(n: int, seed: int, shape=(16,)) -> np.ndarray:
    """Inputs driven by a 4-dimensional latent: what trained features look like."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    mix = np.random.default_rng(100).standard_normal((4, int(np.prod(shape))))
    x = z @ mix + 0.05 * rng.standard_normal((n, int(np.prod(shape))))
    return x.reshape((n,) + shape).astype(np.float32)


def output_error(reference: Model, candidate: Model, x: dict) -> float:
    a = next(iter(run_model(reference, x).values()))
    b = next(iter(run_model(candidate, x).values()))
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_reconstruction_beats_plain_pruning_on_an_mlp():
    model = make_model(
        HEAD
        + """g (float[N,16] x) => (float[N,8] y) <float[32,16] w1, float[32] b1, float[32,8] w2, float[8] b2> {
            h = Gemm<transB=1>(x, w1, b1)
            r = Relu(h)
            y = Gemm(r, w2, b2)
        }"""
    )
    calib, held_out = {"x": correlated(512, 1)}, {"x": correlated(256, 2)}
    plain = prune(model, ratio=0.5, reconstruct=False).model
    with_data = prune(model, calib, ratio=0.5)
    note = with_data.layer_notes["Gemm_1"]
    assert note["reconstructed"] and note["rel_error"] < 0.5 * note["rel_error_before"]
    assert any(line.startswith("re-fitted Gemm_1: output rel. error") for line in with_data.changes)
    e_plain, e_refit = (
        output_error(model, plain, held_out),
        output_error(model, with_data.model, held_out),
    )
    assert e_refit < 0.5 * e_plain, (e_plain, e_refit)
    assert_valid(with_data.model)


def redundant(n: int, base: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Filters mixed from a few base filters, plus noise: trained layers are redundant."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n, base))
    filters = np.tensordot(mix, rng.standard_normal((base,) + shape), 1)
    return (filters + 0.1 * rng.standard_normal((n,) + shape)).astype(np.float32)


def test_reconstruction_beats_plain_pruning_on_a_cnn():
    weights = {"w1": redundant(16, 6, (4, 3, 3), 3), "w2": redundant(8, 3, (16, 3, 3), 4)}
    model = make_model(
        HEAD
        + """g (float[N,4,8,8] x) => (float[N,6,8,8] y)
        <float[16,4,3,3] w1, float[16] b1, float[8,16,3,3] w2, float[8] b2, float[6,8,1,1] w3> {
            a = Conv<pads=[1,1,1,1]>(x, w1, b1)
            r = Relu(a)
            c = Conv<pads=[1,1,1,1]>(r, w2, b2)
            d = Relu(c)
            y = Conv(d, w3)
        }""",
        weights,
    )
    calib, held_out = {"x": correlated(64, 1, (4, 8, 8))}, {"x": correlated(32, 2, (4, 8, 8))}
    plain = prune(model, calib, ratio=0.5, reconstruct=False)
    refit = prune(model, calib, ratio=0.5)
    assert (
        "rel_error" in plain.layer_notes["Conv_1"]
        and "reconstructed" not in plain.layer_notes["Conv_1"]
    )
    for layer in ("Conv_1", "Conv_2"):
        note = refit.layer_notes[layer]
        assert note["reconstructed"] and note["rel_error"] < note["rel_error_before"]
    e_plain = output_error(model, plain.model, held_out)
    e_refit = output_error(model, refit.model, held_out)
    assert e_refit < 0.6 * e_plain, (e_plain, e_refit)
    # The last layer is the output and uses every position: its held-out error (every
    # fifth calibration sample) is exactly the model's output error on those samples.
    held = {"x": calib["x"][4::5]}
    assert refit.layer_notes["Conv_2"]["rel_error"] == pytest.approx(
        output_error(model, refit.model, held), rel=1e-4
    )
    assert plain.layer_notes["Conv_2"]["rel_error"] == pytest.approx(
        output_error(model, plain.model, calib), rel=1e-4
    )
    assert_valid(refit.model)


def test_reconstruction_with_a_fixed_batch_of_one():
    model = make_model(
        CONV_BN_CONV.replace("float[N,3,8,8] x", "float[1,3,8,8] x").replace(
            "float[N,4,8,8] y", "float[1,4,8,8] y"
        ),
        bn(8),
    )
    result = prune(model, {"x": randn(10, 3, 8, 8)}, ratio=0.5, criterion="activation")
    assert result.layer_notes["Conv_1"]["reconstructed"]
    assert_valid(result.model)


def test_reconstruction_is_seeded_and_deterministic():
    model = conv_bn_conv(zero_consumer=False)
    data = {"x": randn(8, 3, 8, 8)}
    a = prune(model, data, ratio=0.5).model
    b = prune(model, data, ratio=0.5).model
    np.testing.assert_array_equal(weight(a, "Conv_1"), weight(b, "Conv_1"))


# ---------------------------------------------------------------------- architectures
NAMES = ARCHITECTURE_NAMES


@pytest.mark.parametrize("name", NAMES)
def test_half_of_every_prunable_group_on_real_architectures(
    name: str, arch_path: Callable[[str], Path]
):
    model = Model.load(arch_path(name))
    result = prune(model, ratio=0.5)
    out = result.model
    assert result.modified
    # Every prunable group is pruned: the only groups left are the fixed ones (the logits).
    skipped = {k: v["skipped"] for k, v in result.layer_notes.items() if "skipped" in v}
    assert all("is fixed" in reason for reason in skipped.values()), skipped
    assert_valid(out)
    x = {"input": randn(3, 3, 32, 32)}
    before, after = run_model(model, x)["logits"], run_model(out, x)["logits"]
    assert after.shape == before.shape == (3, 10)
    assert summarize(out).params < 0.6 * summarize(model).params
    assert [t.name for t in out.outputs] == ["logits"]
    assert out.shape(out.inputs[0])[0] == "N"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2", "googlenet"])
def test_refit_criterion_on_real_architectures(name: str, arch_path: Callable[[str], Path]):
    model = Model.load(arch_path(name))
    images = randn(24, 3, 32, 32, seed=8)
    calib, held_out = {"input": images[:16]}, {"input": images[16:]}
    result = prune(model, calib, ratio=0.5, criterion="refit")
    assert_valid(result.model)
    criteria = {v["criterion"] for v in result.layer_notes.values() if "criterion" in v}
    assert "refit" in criteria and criteria <= {"refit", "l1"}
    x = run_model(result.model, held_out)["logits"]
    assert x.shape == (8, 10) and np.isfinite(x).all()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2", "googlenet"])
def test_reconstruction_on_real_architectures(name: str, arch_path: Callable[[str], Path]):
    model = Model.load(arch_path(name))
    images = randn(48, 3, 32, 32, seed=7)
    calib, held_out = {"input": images[:32]}, {"input": images[32:]}
    plain = prune(model, calib, ratio=0.5, reconstruct=False).model
    refit = prune(model, calib, ratio=0.5)
    assert_valid(refit.model)
    e_plain = output_error(model, plain, held_out)
    e_refit = output_error(model, refit.model, held_out)
    assert e_refit < 0.5 * e_plain, (e_plain, e_refit)
