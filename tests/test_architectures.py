"""End-to-end tests on torchvision-style architectures exported by torch: `fuse` folds
every BatchNorm that follows a layer and keeps the outputs; save/load round-trips; the
channel-dependency view finds the groups each family is known for (residual stages,
depthwise carriers, squeeze-excite couplings, dense and inception concats, channel split
and shuffle, Flatten into Gemm, grouped convolutions).

Layers are named by their torch module path (`layers.0.conv1`); torch exports nodes as
`/layers/layers.0/conv1/Conv`, and Model.load keeps those names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tailor.ir import Model, compare
from tailor.ir.dependency import ChannelGroup, DependencyGraph, dependency_graph
from tailor.passes import PassManager
from tests.helpers import ARCHITECTURE_NAMES, assert_equivalent, assert_valid, op_types, run_passes

NAMES = ARCHITECTURE_NAMES
LAYERS = ("Conv", "ConvTranspose", "Gemm")
# DenseNet's pre-activation BatchNorms (5 dense layers, the transition, norm5) read a
# Concat, and a ReLU separates them from the next Conv: there is no layer to fold into.
REMAINING_BN = {"densenet": 7}
GROUP_COUNTS = {
    "resnet18": 6,
    "resnet50": 10,
    "resnext": 7,
    "mobilenet_v2": 6,
    "mobilenet_v3": 6,
    "efficientnet_b0": 5,
    "densenet": 13,
    "shufflenet_v2": 10,
    "squeezenet": 11,
    "googlenet": 14,
    "vgg": 7,
    "depthwise_multiplier": 3,
}


# ---------------------------------------------------------------------- helpers
def module_path(node_name: str) -> str:
    """The torch module path of an exported node: `/layers/layers.0/conv1/Conv` -> `layers.0.conv1`."""
    parts: list[str] = []
    previous = ""
    for scope in node_name.split("/")[1:-1]:
        # a called module's scope is its name relative to the enclosing called module
        parts.append(scope[len(previous) + 1 :] if scope.startswith(previous + ".") else scope)
        previous = scope
    return ".".join(parts)


def layer(model: Model, path: str, op: str = "Conv") -> str:
    """The name of the `op` node torch exported for the module at `path`."""
    names = [n.name for n in model.nodes if n.op == op and module_path(n.name) == path]
    assert len(names) == 1, f"{op} nodes of module {path}: {names}"
    return names[0]


def feeding_layer(model: Model, tensor) -> str:
    """The nearest layer upstream of `tensor`, walking back along first inputs."""
    node = model.producer(tensor)
    while node.op not in LAYERS:
        node = model.producer(node.inputs[0])
    return node.name


def group(dg: DependencyGraph, *producers: str) -> ChannelGroup:
    """The one group produced by exactly these layers."""
    found = [g for g in dg.groups if set(g.producers) == set(producers)]
    assert len(found) == 1, f"groups produced by {producers}: {[g.describe() for g in found]}"
    return found[0]


def is_depthwise(model: Model, node) -> bool:
    weight = model.constant_value(node.inputs[1])
    return node.op == "Conv" and int(node.attrs.get("group", 1)) > 1 and weight.shape[1] == 1


def bn_after_layer(model: Model) -> list[str]:
    return [
        n.name
        for n in model.nodes
        if n.op == "BatchNormalization"
        and model.producer(n.inputs[0]) is not None
        and model.producer(n.inputs[0]).op in LAYERS
    ]


def summary(dg: DependencyGraph) -> list[tuple]:
    """What pruning needs from each group, without the carriers (which fuse changes)."""
    return sorted(
        (
            tuple(sorted(g.producers)),
            tuple(sorted(g.consumers)),
            g.size,
            g.prunable,
            g.blocks,
            tuple((k, tuple(v)) for k, v in sorted(g.producers.items())),
            tuple((k, tuple(v)) for k, v in sorted(g.consumers.items())),
        )
        for g in dg.groups
    )


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def loaded(arch_path: Callable[[str], Path]) -> Callable[[str], Model]:
    """name -> a freshly loaded model (tests may change it)."""
    return lambda name: Model.load(arch_path(name))


@pytest.fixture(scope="module")
def fused(loaded: Callable[[str], Model]) -> Callable[[str], Model]:
    """name -> the model after `fuse` (computed once per module; a copy per call)."""
    cache: dict[str, Model] = {}

    def get(name: str) -> Model:
        if name not in cache:
            cache[name] = run_passes(loaded(name), "fuse")
        return cache[name].copy()

    return get


@pytest.fixture(scope="module")
def view(loaded: Callable[[str], Model]) -> Callable[[str], tuple[Model, DependencyGraph]]:
    """name -> (exported model, its dependency graph), computed once per module."""
    cache: dict[str, tuple[Model, DependencyGraph]] = {}

    def get(name: str) -> tuple[Model, DependencyGraph]:
        if name not in cache:
            model = loaded(name).infer_shapes()
            cache[name] = (model, dependency_graph(model))
        return cache[name]

    return get


# ---------------------------------------------------------------------- export
def test_names_match_the_architecture_registry(arch_path):
    from tests.architectures import ARCHITECTURES

    assert tuple(ARCHITECTURES) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_export_keeps_batchnorm_and_dynamic_batch(name, arch_path, loaded):
    path = arch_path(name)
    assert path.stat().st_size < 2 << 20
    model = loaded(name)
    assert [(t.name, model.shape(t)) for t in model.inputs] == [("input", ["N", 3, 32, 32])]
    assert [(t.name, model.shape(t)) for t in model.outputs] == [("logits", ["N", 10])]
    bns = [n for n in model.nodes if n.op == "BatchNormalization"]
    if name == "squeezenet":
        assert not bns
    else:
        # torch did not fold them away: tailor's fold is what the fuse tests exercise
        assert bn_after_layer(model)
        assert len(bn_after_layer(model)) == len(bns) - REMAINING_BN.get(name, 0)


# ---------------------------------------------------------------------- fuse
@pytest.mark.parametrize("name", NAMES)
def test_fuse_folds_batchnorm_and_keeps_outputs(name, loaded, fused):
    before, after = loaded(name), fused(name)
    assert not bn_after_layer(after)
    remaining = [n for n in after.nodes if n.op == "BatchNormalization"]
    assert len(remaining) == REMAINING_BN.get(name, 0)
    # DenseNet's pre-activation BNs read a Concat or a pooling (a one-input Concat is
    # removed): no layer output to fold them into.
    assert all(
        after.producer(n.inputs[0]).op in ("Concat", "AveragePool", "MaxPool") for n in remaining
    )
    layers_before = {op: c for op, c in Counter(op_types(before)).items() if op in LAYERS}
    assert {op: c for op, c in Counter(op_types(after)).items() if op in LAYERS} == layers_before
    if name == "squeezenet":
        # no BatchNorm, no Dropout in an eval export: nothing to fuse
        assert sorted((n.name, n.op) for n in after.nodes) == sorted(
            (n.name, n.op) for n in before.nodes
        )
        assert not PassManager.from_text("fuse").run(before).modified
    else:
        assert len(after.nodes) < len(before.nodes)
    assert [(t.name, after.shape(t)) for t in after.inputs] == [("input", ["N", 3, 32, 32])]
    assert [t.name for t in after.outputs] == ["logits"]
    assert_equivalent(before, after, rtol=1e-5, batch=3)
    assert_valid(after)


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_round_trip(name, fused, tmp_path):
    model = fused(name)
    path = model.save(tmp_path / f"{name}.onnx")
    back = Model.load(path)
    assert [(n.name, n.op) for n in back.nodes] == [(n.name, n.op) for n in model.nodes]
    assert back.fingerprint() == model.fingerprint()
    assert compare(model, back).max_abs == 0.0


# ---------------------------------------------------------------------- dependency view
@pytest.mark.parametrize("name", NAMES)
def test_groups_partition_every_layer(name, view):
    model, dg = view(name)
    assert len(dg.groups) == GROUP_COUNTS[name]
    for node in model.nodes:
        if node.op not in LAYERS:
            continue
        if is_depthwise(model, node):
            # a depthwise conv is a carrier: its channels are its input's channels
            assert not dg.produced_by(node.name) and not dg.consumed_by(node.name)
            assert any(node.name in g.carriers for g in dg.groups)
            continue
        produced = dg.produced_by(node.name)
        assert (sum(g.producers[node.name] >= 0 for g in produced) == 1).all(), node.name
        for g in produced:
            labels = g.producers[node.name]
            assert sorted(labels[labels >= 0]) == list(range(g.size))
        consumed = dg.consumed_by(node.name)
        if model.is_graph_input(node.inputs[0]):
            assert not consumed
        else:
            assert (sum(g.consumers[node.name] >= 0 for g in consumed) == 1).all(), node.name
    # Only the logits are the model's interface; every other group can be pruned.
    fixed = [g for g in dg.groups if not g.prunable]
    assert [list(g.producers) for g in fixed] == [[feeding_layer(model, model.outputs[0])]]
    assert fixed[0].reasons == ["reaches graph output 'logits'"]


@pytest.mark.parametrize("name", NAMES)
def test_fuse_keeps_the_channel_groups(name, view, fused):
    _, dg = view(name)
    after = dependency_graph(fused(name).infer_shapes())
    assert summary(after) == summary(dg)


def test_resnet18_residual_stage_is_one_group(view):
    m, dg = view("resnet18")
    stage2 = group(
        dg,
        layer(m, "layers.1.downsample.0"),
        layer(m, "layers.1.conv2"),
        layer(m, "layers.2.conv2"),
    )
    assert stage2.size == 16 and stage2.prunable
    assert set(stage2.consumers) == {layer(m, "layers.2.conv1"), layer(m, "fc", "Gemm")}
    for labels in stage2.producers.values():
        np.testing.assert_array_equal(labels, np.arange(16))
    # Every residual Add couples the layers upstream of both its inputs.
    adds = [n for n in m.nodes if n.op == "Add"]
    assert len(adds) == 3
    for add in adds:
        feeding = {feeding_layer(m, t) for t in add.inputs}
        assert len(feeding) == 2
        g = dg.produced_by(feeding.pop())[0]
        assert set(feeding) <= set(g.producers) and add.name in g.carriers
    stage1 = group(dg, layer(m, "stem.0"), layer(m, "layers.0.conv2"))
    assert set(stage1.consumers) == {
        layer(m, "layers.0.conv1"),
        layer(m, "layers.1.conv1"),
        layer(m, "layers.1.downsample.0"),
    }
    # The inner conv of each block is its own group: one producer, read by the block's conv2.
    for block in ("layers.0", "layers.1", "layers.2"):
        inner = group(dg, layer(m, f"{block}.conv1"))
        assert inner.prunable and list(inner.consumers) == [layer(m, f"{block}.conv2")]
    assert not group(dg, layer(m, "fc", "Gemm")).prunable


def test_resnet50_bottleneck_groups(view):
    m, dg = view("resnet50")
    res = group(
        dg,
        layer(m, "layers.0.downsample.0"),
        layer(m, "layers.0.conv3.0"),
        layer(m, "layers.1.conv3.0"),
    )
    assert res.size == 16 and res.prunable
    assert set(res.consumers) == {
        layer(m, "layers.1.conv1.0"),
        layer(m, "layers.2.conv1.0"),
        layer(m, "layers.2.downsample.0"),
    }
    for block, width in (("layers.0", 4), ("layers.1", 4), ("layers.2", 8)):
        reduce = group(dg, layer(m, f"{block}.conv1.0"))
        middle = group(dg, layer(m, f"{block}.conv2.0"))
        assert reduce.size == middle.size == width and reduce.prunable and middle.prunable
        assert list(reduce.consumers) == [layer(m, f"{block}.conv2.0")]
        assert list(middle.consumers) == [layer(m, f"{block}.conv3.0")]
    last = group(dg, layer(m, "layers.2.downsample.0"), layer(m, "layers.2.conv3.0"))
    assert last.size == 32 and list(last.consumers) == [layer(m, "fc", "Gemm")]


def test_resnext_grouped_conv_prunes_in_blocks(view):
    m, dg = view("resnext")
    for block in ("layers.0", "layers.1"):
        grouped = group(dg, layer(m, f"{block}.conv2.0"))
        assert grouped.blocks == 4 and grouped.size == 16 and grouped.prunable
        assert list(grouped.consumers) == [layer(m, f"{block}.conv3.0")]
        # what the grouped conv reads is cut in the same 4 blocks
        assert group(dg, layer(m, f"{block}.conv1.0")).blocks == 4
    res = group(
        dg,
        layer(m, "layers.0.downsample.0"),
        layer(m, "layers.0.conv3.0"),
        layer(m, "layers.1.conv3.0"),
    )
    assert res.blocks == 1


def test_mobilenet_v2_depthwise_carries_the_expand_group(view):
    m, dg = view("mobilenet_v2")
    dw = layer(m, "2.conv.1.0")
    expand = group(dg, layer(m, "2.conv.0.0"))
    assert expand.size == 48 and expand.prunable
    assert dw in expand.carriers and dw not in expand.consumers
    assert list(expand.consumers) == [layer(m, "2.conv.2.0")]
    np.testing.assert_array_equal(expand.consumers[layer(m, "2.conv.2.0")], np.arange(48))
    assert "Clip" in {m.node(c).op for c in expand.carriers}  # ReLU6
    # first block (no expansion): the depthwise conv carries the stem's residual group
    stem = group(dg, layer(m, "0.0"), layer(m, "1.conv.1.0"))
    assert layer(m, "1.conv.0.0") in stem.carriers
    assert set(stem.consumers) == {layer(m, "1.conv.1.0"), layer(m, "2.conv.0.0")}
    res = group(dg, layer(m, "2.conv.2.0"), layer(m, "3.conv.2.0"))
    assert res.size == 12 and set(res.consumers) == {layer(m, "3.conv.0.0"), layer(m, "4.0")}


@pytest.mark.parametrize(
    ("name", "hidden", "squeeze", "gate"),
    [("mobilenet_v3", 16, 4, "HardSigmoid"), ("efficientnet_b0", 32, 2, "Sigmoid")],
)
def test_squeeze_excite_couples_expand_with_trunk(name, hidden, squeeze, gate, view):
    m, dg = view(name)
    fc1, fc2 = layer(m, "1.block.2.fc1"), layer(m, "1.block.2.fc2")
    reduce = group(dg, fc1)
    assert reduce.size == squeeze and reduce.prunable and list(reduce.consumers) == [fc2]
    trunk = group(dg, layer(m, "1.block.0.0"), fc2)
    assert trunk.size == hidden and trunk.prunable
    assert set(trunk.consumers) == {fc1, layer(m, "1.block.3.0")}
    np.testing.assert_array_equal(trunk.producers[fc2], trunk.producers[layer(m, "1.block.0.0")])
    # the excitation multiplies the trunk: the Mul and the gate carry the group
    mul, gate_node = layer(m, "1.block.2", "Mul"), layer(m, "1.block.2.gate", gate)
    assert m.producer(m.node(mul).inputs[1]).name == gate_node
    assert {mul, gate_node} <= set(trunk.carriers)
    assert layer(m, "1.block.1.0") in trunk.carriers  # the depthwise conv


def test_densenet_dense_layers_are_read_by_every_later_layer(view):
    m, dg = view("densenet")
    blocks = (  # block, what feeds it, its input width, dense layers, what reads its concat
        ("block1", layer(m, "stem.0.0"), 8, 3, layer(m, "transition.2")),
        ("block2", layer(m, "transition.2"), 10, 2, layer(m, "fc", "Gemm")),
    )
    for block, source, start, count, after in blocks:
        readers = [layer(m, f"{block}.layers.{j}.conv1") for j in range(count)] + [after]
        base = group(dg, source)
        assert set(base.consumers) == set(readers)
        for j, r in enumerate(readers):
            # reader j sees the block input and the 4 channels of each earlier dense layer
            assert len(base.consumers[r]) == start + 4 * j
            np.testing.assert_array_equal(base.consumers[r][:start], np.arange(start))
            assert (base.consumers[r][start:] == -1).all()
        for i in range(count):
            g = group(dg, layer(m, f"{block}.layers.{i}.conv2"))
            assert g.size == 4 and g.prunable
            assert set(g.consumers) == set(readers[i + 1 :])
            offset = start + 4 * i
            for j, r in enumerate(readers[i + 1 :], start=i + 1):
                expected = np.full(start + 4 * j, -1)
                expected[offset : offset + 4] = np.arange(4)
                np.testing.assert_array_equal(g.consumers[r], expected)
            # the bottleneck conv1 of the same layer is its own group
            inner = group(dg, layer(m, f"{block}.layers.{i}.conv1"))
            assert inner.size == 8 and list(inner.consumers) == [
                layer(m, f"{block}.layers.{i}.conv2")
            ]
    # the pre-activation BatchNorms after each concat carry the channels they normalise
    bn1 = m.node("/block1/layers.1/norm1/BatchNormalization")
    assert bn1.name in group(dg, layer(m, "block1.layers.0.conv2")).carriers


def test_shufflenet_split_and_shuffle_permutations(view):
    m, dg = view("shufflenet_v2")
    b1 = layer(m, "stage.0.branch1.1.0")
    b2 = layer(m, "stage.0.branch2.2.0")
    unit2_in = layer(m, "stage.1.branch2.0.0")
    unit2_out = layer(m, "stage.1.branch2.2.0")
    conv5 = layer(m, "conv5.0")
    # unit 1 output after the shuffle: [b1_0, b2_0, b1_1, b2_1, ..., b1_7, b2_7]; the
    # split hands channels 0-3 of each branch to the identity half, 4-7 to unit 2.
    by = {(p, tuple(g.consumers)): g for g in dg.groups for p in g.producers}
    kept_b1, kept_b2 = by[(b1, (conv5,))], by[(b2, (conv5,))]
    split_b1, split_b2 = by[(b1, (unit2_in,))], by[(b2, (unit2_in,))]
    minus = np.full(4, -1)
    np.testing.assert_array_equal(kept_b1.producers[b1], np.r_[np.arange(4), minus])
    np.testing.assert_array_equal(split_b1.producers[b1], np.r_[minus, np.arange(4)])
    np.testing.assert_array_equal(kept_b2.producers[b2], np.r_[np.arange(4), minus])
    np.testing.assert_array_equal(split_b2.producers[b2], np.r_[minus, np.arange(4)])
    np.testing.assert_array_equal(split_b1.consumers[unit2_in], [0, -1, 1, -1, 2, -1, 3, -1])
    np.testing.assert_array_equal(split_b2.consumers[unit2_in], [-1, 0, -1, 1, -1, 2, -1, 3])
    # unit 2: concat(identity half, branch) shuffled again before conv5
    five = np.full(16, -1)
    expect_b1, expect_b2, expect_new = five.copy(), five.copy(), five.copy()
    expect_b1[0::4], expect_b2[2::4], expect_new[1::2] = np.arange(4), np.arange(4), np.arange(8)
    np.testing.assert_array_equal(kept_b1.consumers[conv5], expect_b1)
    np.testing.assert_array_equal(kept_b2.consumers[conv5], expect_b2)
    new = group(dg, unit2_out)
    np.testing.assert_array_equal(new.consumers[conv5], expect_new)
    assert all(g.prunable for g in (kept_b1, kept_b2, split_b1, split_b2, new))
    carriers = {m.node(c).op for c in new.carriers}
    assert {"Concat", "Reshape", "Transpose"} <= carriers


def test_squeezenet_fire_expands_are_read_at_their_offsets(view):
    m, dg = view("squeezenet")
    for fire, nxt, e in (("3", "4.squeeze", 8), ("4", "6.squeeze", 8), ("6", "8", 12)):
        squeeze = group(dg, layer(m, f"{fire}.squeeze"))
        assert set(squeeze.consumers) == {
            layer(m, f"{fire}.expand1x1"),
            layer(m, f"{fire}.expand3x3"),
        }
        reader = layer(m, nxt)
        e1, e3 = group(dg, layer(m, f"{fire}.expand1x1")), group(dg, layer(m, f"{fire}.expand3x3"))
        assert list(e1.consumers) == list(e3.consumers) == [reader]
        np.testing.assert_array_equal(e1.consumers[reader], np.r_[np.arange(e), np.full(e, -1)])
        np.testing.assert_array_equal(e3.consumers[reader], np.r_[np.full(e, -1), np.arange(e)])
        assert e1.prunable and e3.prunable
    # no Gemm: the last conv's channels are the logits
    assert not group(dg, layer(m, "8")).prunable


def test_googlenet_inception_branches_are_read_at_concat_offsets(view):
    m, dg = view("googlenet")
    branches = ("branch1.0", "branch2.1.0", "branch3.1.0", "branch4.1.0")
    for block, sizes, readers in (
        (
            "2",
            (4, 6, 3, 3),
            [
                layer(m, f"3.{b}")
                for b in ("branch1.0", "branch2.0.0", "branch3.0.0", "branch4.1.0")
            ],
        ),
        ("3", (6, 8, 4, 4), [layer(m, "7", "Gemm")]),
    ):
        total, offset = sum(sizes), 0
        for branch, size in zip(branches, sizes, strict=True):
            g = group(dg, layer(m, f"{block}.{branch}"))
            assert g.size == size and g.prunable and set(g.consumers) == set(readers)
            expected = np.full(total, -1)
            expected[offset : offset + size] = np.arange(size)
            for r in readers:
                np.testing.assert_array_equal(g.consumers[r], expected)
            offset += size
    # the pool branch reads the block input through its MaxPool
    pool = m.producer(m.node(layer(m, "3.branch4.1.0")).inputs[0])
    assert pool.op == "MaxPool" and pool.name in group(dg, layer(m, "2.branch1.0")).carriers


def test_vgg_flatten_repeats_each_channel_per_position(view):
    m, dg = view("vgg")
    last = group(dg, layer(m, "5.0"))
    fc = layer(m, "8", "Gemm")
    assert last.size == 16 and last.prunable and list(last.consumers) == [fc]
    # 16 channels x 4 x 4 flattened channel-major: each label repeats H*W = 16 times
    np.testing.assert_array_equal(last.consumers[fc], np.repeat(np.arange(16), 16))
    assert any(m.node(c).op == "Flatten" for c in last.carriers)
    hidden = group(dg, fc)
    assert hidden.size == 32 and list(hidden.consumers) == [layer(m, "11", "Gemm")]


def test_depthwise_multiplier_repeats_input_channels(view):
    m, dg = view("depthwise_multiplier")
    stem = group(dg, layer(m, "0.0"))
    assert stem.size == 8 and stem.prunable and layer(m, "1.0") in stem.carriers
    # output channel 2c+j of the depthwise conv reads input channel c
    np.testing.assert_array_equal(stem.consumers[layer(m, "2.0")], np.repeat(np.arange(8), 2))
