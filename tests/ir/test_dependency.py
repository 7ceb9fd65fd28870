"""The channel-dependency view on each coupling pattern, with the expected groups."""

from __future__ import annotations

import numpy as np
import pytest

from tailor.ir.dependency import dependency_graph
from tests.helpers import make_model

HEAD = '<ir_version: 8, opset_import: ["": 17]>\n'


def groups_by_producers(model):
    return {tuple(g.producers): g for g in dependency_graph(model).groups}


def test_batchnorm_and_activation_follow_the_conv():
    m = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
        <float[8,3,3,3] w1, float[8] s, float[8] b, float[8] mu, float[8] var, float[4,8,1,1] w2> {
            a = Conv<pads=[1,1,1,1]>(x, w1)
            n = BatchNormalization(a, s, b, mu, var)
            r = Relu(n)
            y = Conv(r, w2)
        }"""
    )
    groups = groups_by_producers(m)
    g = groups[("Conv_0",)]
    assert g.size == 8 and g.prunable
    assert list(g.consumers) == ["Conv_1"]
    assert {"BatchNormalization_0", "Relu_0"} <= set(g.carriers)
    np.testing.assert_array_equal(g.producers["Conv_0"], np.arange(8))
    np.testing.assert_array_equal(g.consumers["Conv_1"], np.arange(8))
    # The last conv feeds the graph output: its channels are the model's interface.
    out = groups[("Conv_1",)]
    assert not out.prunable and "graph output 'y'" in out.reasons[0]


def test_residual_add_couples_both_branches():
    m = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,10] y)
        <float[8,3,3,3] w1, float[8,8,3,3] w2, float[8,8,3,3] w3, float[10,8] wf> {
            a = Conv<pads=[1,1,1,1]>(x, w1)
            ar = Relu(a)
            b = Conv<pads=[1,1,1,1]>(ar, w2)
            br = Relu(b)
            c = Conv<pads=[1,1,1,1]>(br, w3)
            s = Add(c, ar)
            sr = Relu(s)
            p = GlobalAveragePool(sr)
            f = Flatten(p)
            y = Gemm<transB=1>(f, wf)
        }"""
    )
    groups = groups_by_producers(m)
    assert set(groups) == {("Conv_0", "Conv_2"), ("Conv_1",), ("Gemm_0",)}
    res = groups[("Conv_0", "Conv_2")]
    assert res.size == 8 and res.prunable
    assert set(res.consumers) == {"Conv_1", "Gemm_0"}
    # Channel i of both branches is the same coupled channel.
    np.testing.assert_array_equal(res.producers["Conv_0"], res.producers["Conv_2"])
    assert {"Add_0", "GlobalAveragePool_0", "Flatten_0"} <= set(res.carriers)


def test_concat_keeps_branches_separate_and_maps_positions():
    m = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
        <float[6,3,1,1] w1, float[2,3,3,3] w2, float[4,8,1,1] w3> {
            a = Conv(x, w1)
            b = Conv<pads=[1,1,1,1]>(x, w2)
            c = Concat<axis=1>(a, b)
            y = Conv(c, w3)
        }"""
    )
    groups = groups_by_producers(m)
    ga, gb = groups[("Conv_0",)], groups[("Conv_1",)]
    assert (ga.size, gb.size) == (6, 2)
    np.testing.assert_array_equal(ga.consumers["Conv_2"], [0, 1, 2, 3, 4, 5, -1, -1])
    np.testing.assert_array_equal(gb.consumers["Conv_2"], [-1, -1, -1, -1, -1, -1, 0, 1])
    assert "Concat_0" in ga.carriers and "Concat_0" in gb.carriers


def test_squeeze_excite_mul_couples_excitation_with_trunk():
    m = make_model(
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
    groups = groups_by_producers(m)
    se = groups[("Conv_0", "Conv_2")]
    assert se.size == 8 and se.prunable
    assert set(se.consumers) == {"Conv_1", "Conv_3"}
    reduce = groups[("Conv_1",)]
    assert reduce.size == 2 and reduce.prunable and set(reduce.consumers) == {"Conv_2"}


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_passes_channels_through(multiplier):
    c = 4
    m = make_model(
        HEAD
        + f"""g (float[N,3,8,8] x) => (float[N,5,8,8] y)
        <float[{c},3,1,1] w1, float[{c * multiplier},1,3,3] wd, float[{c * multiplier}] bd, float[5,{c * multiplier},1,1] w2> {{
            a = Conv(x, w1)
            d = Conv<group={c},pads=[1,1,1,1]>(a, wd, bd)
            y = Conv(d, w2)
        }}"""
    )
    groups = groups_by_producers(m)
    assert set(groups) == {("Conv_0",), ("Conv_2",)}
    g = groups[("Conv_0",)]
    assert g.size == c and g.prunable and "Conv_1" in g.carriers
    # Output channel k*m+j of the depthwise conv reads input channel k.
    np.testing.assert_array_equal(g.consumers["Conv_2"], np.repeat(np.arange(c), multiplier))


def test_grouped_conv_requires_equal_pruning_per_block():
    m = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
        <float[8,3,1,1] w1, float[8,4,3,3] wg, float[4,8,1,1] w3> {
            a = Conv(x, w1)
            b = Conv<group=2,pads=[1,1,1,1]>(a, wg)
            y = Conv(b, w3)
        }"""
    )
    groups = groups_by_producers(m)
    assert groups[("Conv_0",)].blocks == 2 and groups[("Conv_0",)].prunable
    assert groups[("Conv_1",)].blocks == 2 and set(groups[("Conv_1",)].consumers) == {"Conv_2"}


def test_flatten_into_gemm_repeats_each_channel_over_space():
    m = make_model(
        HEAD
        + """g (float[N,3,4,4] x) => (float[N,10] y)
        <float[6,3,3,3] w1, float[10,24] wf, float[10] bf> {
            a = Conv<strides=[2,2],pads=[1,1,1,1]>(x, w1)
            f = Flatten(a)
            y = Gemm<transB=1>(f, wf, bf)
        }"""
    )
    g = groups_by_producers(m)[("Conv_0",)]
    assert g.prunable and g.size == 6
    np.testing.assert_array_equal(g.consumers["Gemm_0"], np.repeat(np.arange(6), 4))


def test_matmul_mlp_on_tokens_uses_the_last_axis():
    m = make_model(
        HEAD
        + """g (float[N,5,8] x) => (float[N,5,3] y)
        <float[8,16] w1, float[16] b1, float[16,3] w2> {
            h = MatMul(x, w1)
            hb = Add(h, b1)
            a = Relu(hb)
            y = MatMul(a, w2)
        }"""
    )
    g = groups_by_producers(m)[("MatMul_0",)]
    assert g.prunable and g.size == 16 and set(g.consumers) == {"MatMul_1"}
    assert "Add_0" in g.carriers


def test_split_and_slice_select_channel_ranges():
    m = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,2,8,8] y, float[N,2,8,8] z)
        <float[8,3,1,1] w1, int64[2] sp = {5, 3}, float[2,5,1,1] w2,
         int64[1] st = {1}, int64[1] en = {3}, int64[1] ax = {1}, float[2,2,1,1] w3> {
            a = Conv(x, w1)
            l, r = Split<axis=1>(a, sp)
            y = Conv(l, w2)
            s = Slice(r, st, en, ax)
            z = Conv(s, w3)
        }"""
    )
    g = dependency_graph(m).produced_by("Conv_0")
    by_consumer = {tuple(x.consumers): x for x in g}
    left, sliced = by_consumer[("Conv_1",)], by_consumer[("Conv_2",)]
    assert left.size == 5 and left.prunable
    np.testing.assert_array_equal(left.producers["Conv_0"], [0, 1, 2, 3, 4, -1, -1, -1])
    assert sliced.size == 2
    np.testing.assert_array_equal(sliced.producers["Conv_0"], [-1, -1, -1, -1, -1, -1, 0, 1])
    # Channel 5 is computed but sliced away: a group nobody reads.
    unread = by_consumer[()]
    np.testing.assert_array_equal(unread.producers["Conv_0"], [-1, -1, -1, -1, -1, 0, -1, -1])


def test_channel_shuffle_is_followed_exactly():
    m = make_model(
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
    dg = dependency_graph(m)
    left = next(g for g in dg.produced_by("Conv_0") if "Conv_2" in g.consumers)
    branch = dg.produced_by("Conv_1")[0]
    # After the shuffle, even channels come from the identity half, odd from the branch.
    np.testing.assert_array_equal(left.consumers["Conv_2"], [0, -1, 1, -1, 2, -1, 3, -1])
    np.testing.assert_array_equal(branch.consumers["Conv_2"], [-1, 0, -1, 1, -1, 2, -1, 3])
    assert {"Reshape_0", "Transpose_0", "Reshape_1"} <= set(branch.carriers)


def test_what_channel_removal_cannot_follow_is_fixed():
    m = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,6,8,8] z)
        <float[8,3,1,1] w1, float[1,3,1,1] wa, float[6,3,1,1] w2, float[4,8,1,1] w3, float[6,6,1,1] w4> {
            a = Conv(x, w1)
            att = Conv(x, wa)
            g = Mul(a, att)
            y = Conv(g, w3)
            b = Conv(x, w2)
            sm = Softmax<axis=1>(b)
            z = Conv(sm, w4)
        }"""
    )
    groups = groups_by_producers(m)
    # One attention channel broadcast over eight: the trunk stays prunable, the map is fixed.
    assert groups[("Conv_0",)].prunable
    assert not groups[("Conv_1",)].prunable and "broadcasts" in groups[("Conv_1",)].reasons[0]
    soft = groups[("Conv_3",)]
    assert not soft.prunable and "combines channels" in soft.reasons[0]


def test_graph_input_added_to_a_branch_fixes_it():
    m = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
        <float[3,3,3,3] w1, float[4,3,1,1] w2> {
            a = Conv<pads=[1,1,1,1]>(x, w1)
            s = Add(a, x)
            y = Conv(s, w2)
        }"""
    )
    g = groups_by_producers(m)[("Conv_0",)]
    assert not g.prunable and g.reasons == ["fed by graph input 'x'"]


def test_dynamic_spatial_dims_block_instead_of_failing():
    m = make_model(
        HEAD
        + """g (float[N,3,H,W] x) => (float[N,4,H,W] y)
        <float[8,3,1,1] w1, float[4,8,1,1] w2> {
            a = Conv(x, w1)
            y = Conv(a, w2)
        }"""
    )
    groups = dependency_graph(m).groups
    assert all(not g.prunable for g in groups)
    m.set_input_shapes({"x": [1, 3, 8, 8]})
    assert groups_by_producers(m)[("Conv_0",)].prunable


def test_shape_arithmetic_after_a_symbolic_batch_is_observed():
    # torchvision's channel_shuffle and chunk: view(n, -1, h, w) and Slice bounds computed
    # from Shape leave ONNX shape inference with unknown channels; the view runs the model
    # once at batch 1 instead of fixing every channel after the shuffle.
    m = make_model(
        HEAD
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y)
        <float[8,3,1,1] w1, float[4,4,1,1] w2, int64[4] s5 = {2, 4, 8, 8}, int64[3] s4 = {-1, 8, 8},
         int64[1] zero = {0}, int64[1] ax = {1}, int64[1] two = {2}> {
            a = Conv(x, w1)
            s = Shape(a)
            n = Gather<axis=0>(s, zero)
            t5 = Concat<axis=0>(n, s5)
            r = Reshape(a, t5)
            tt = Transpose<perm=[0,2,1,3,4]>(r)
            t4 = Concat<axis=0>(n, s4)
            sh = Reshape(tt, t4)
            c = Gather<axis=0>(s, ax)
            half = Div(c, two)
            l = Slice(sh, zero, half, ax)
            y = Conv(l, w2)
        }"""
    )
    assert m.shape(m.tensor("sh"))[1] != 8  # what ONNX shape inference leaves
    read = next(g for g in dependency_graph(m).produced_by("Conv_0") if g.consumers)
    assert read.prunable and read.size == 4
    # shuffled channel k is channel [0, 4, 1, 5, 2, 6, 3, 7][k]; the slice keeps the first 4
    np.testing.assert_array_equal(read.producers["Conv_0"], [0, 1, -1, -1, 2, 3, -1, -1])
    np.testing.assert_array_equal(read.consumers["Conv_1"], [0, 2, 1, 3])
    assert m.shape(m.tensor("sh"))[1] != 8  # the caller's model is left as it was
