"""The model as a graph: a thin wrapper over onnx-graphsurgeon.

Passes see :class:`Model` and the graph objects it hands out (nodes and tensors); the
name-keyed lookups of onnx-graphsurgeon stay inside this module. Loading validates the
file (protobuf, checker, operator domains, external-data paths) and never executes
anything from it; saving is atomic.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from tailor.errors import DynamicShapeError, ModelLoadError, UnsupportedModelError

__all__ = [
    "Model",
    "Node",
    "Tensor",
    "Variable",
    "Constant",
    "SUPPORTED_DOMAINS",
    "over_protobuf_limit",
]

logger = logging.getLogger(__name__)

Node = gs.Node
Tensor = gs.Tensor
Variable = gs.Variable
Constant = gs.Constant

#: Operator domains tailor understands. Anything else is refused at load time, because a
#: pass cannot reason about an operator whose semantics it does not know.
SUPPORTED_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")

# Protobuf cannot serialise a message over 2 GiB; above this we write external data.
_EXTERNAL_DATA_THRESHOLD = 1 << 30
# Initializers larger than this are stripped before shape inference (only dims matter).
_SKELETON_MAX_ELEMENTS = 64


class Model:
    """An ONNX model held as an editable graph.

    Args:
        graph: the onnx-graphsurgeon graph.
        meta: model-level fields to keep on export (ir_version, producer, metadata).
        source: where the model came from, for messages.
    """

    def __init__(
        self, graph: gs.Graph, meta: onnx.ModelProto | None = None, source: str = "<memory>"
    ):
        self.graph = graph
        self._meta = meta if meta is not None else onnx.ModelProto()
        self.source = source
        self._names: set[str] | None = None

    # ------------------------------------------------------------------ load / save
    @classmethod
    def load(
        cls, source: str | os.PathLike | bytes | onnx.ModelProto, *, check: bool = True
    ) -> Model:
        """Loads a model from a path, serialized bytes or a ModelProto.

        External data (models over 2 GB) is read from files beside the model; their paths
        must stay inside the model's folder.

        Raises:
            ModelLoadError: missing, unreadable, corrupt or truncated file; unsafe paths.
            UnsupportedModelError: an operator from a domain tailor does not know.
        """
        if isinstance(source, onnx.ModelProto):
            proto, label, base_dir = source, "<ModelProto>", None
        elif isinstance(source, (bytes, bytearray, memoryview)):
            proto, label, base_dir = _parse(bytes(source), "<bytes>"), "<bytes>", None
        else:
            path = Path(source)
            label = str(path)
            if not path.exists():
                raise ModelLoadError(f"model file {label} does not exist")
            if not path.is_file():
                raise ModelLoadError(f"model path {label} is not a file")
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ModelLoadError(f"cannot read {label}: {e.strerror}") from e
            proto, base_dir = _parse(data, label), path.resolve().parent
        external = _has_external_data(proto)
        if external:
            if base_dir is None:
                raise ModelLoadError(
                    f"{label} references external data files; load it from its path, not from bytes"
                )
            _check_external_paths(proto, base_dir, label)
        if check:
            # With external data the checker must get the path: given a proto it would look
            # for the data files relative to the working directory.
            _check_proto(proto, label, Path(source) if external else None)
        if external:
            try:
                external_data_helper.load_external_data_for_model(proto, str(base_dir))
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"cannot read external data of {label}: {e}") from e
            # onnx sets data_location=DEFAULT explicitly; cleared so the model serializes
            # (and fingerprints) exactly like one saved without external data.
            for tensor in external_data_helper._get_all_tensors(proto):
                tensor.ClearField("data_location")
        try:
            graph = gs.import_onnx(proto)
        except Exception as e:  # graphsurgeon raises bare exceptions on malformed graphs
            raise ModelLoadError(f"cannot import {label}: {_first_line(e)}") from e
        _name_nodes(graph)
        meta = onnx.ModelProto()
        meta.CopyFrom(proto)
        meta.ClearField("graph")
        meta.ClearField("functions")
        return cls(graph, meta, label)

    def to_proto(self) -> onnx.ModelProto:
        """Exports the graph as a ModelProto, keeping the model-level metadata."""
        proto = gs.export_onnx(self.graph, do_type_check=True)
        for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            if self._meta.HasField(field):
                setattr(proto, field, getattr(self._meta, field))
        del proto.metadata_props[:]
        proto.metadata_props.extend(self._meta.metadata_props)
        if self._meta.ir_version:
            proto.ir_version = max(
                self._meta.ir_version, min(proto.ir_version, self._meta.ir_version)
            )
        return proto

    @property
    def metadata(self) -> dict[str, str]:
        """The model's `metadata_props` as a dict (a copy)."""
        return {p.key: p.value for p in self._meta.metadata_props}

    def set_metadata(self, key: str, value: str) -> None:
        """Sets one `metadata_props` entry, replacing an existing one with the same key."""
        for prop in self._meta.metadata_props:
            if prop.key == key:
                prop.value = value
                return
        self._meta.metadata_props.add(key=key, value=value)

    def to_bytes(self) -> bytes:
        """Serialized model; raises ModelLoadError-free ValueError above 2 GiB (use save)."""
        return self.to_proto().SerializeToString()

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
        """Writes the model atomically: a temporary file is renamed into place.

        Args:
            path: destination `.onnx` file.
            external_data: store weights in `<stem>.data` beside the model. Default: only
                when the weights exceed 1 GiB.

        Returns:
            The path written.
        """
        path = Path(path)
        proto = self.to_proto()
        if external_data is None:
            external_data = _weight_bytes(proto) > _EXTERNAL_DATA_THRESHOLD
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tmp_model = tmp_dir / path.name
            data_name = f"{path.stem}.data"
            if external_data:
                onnx.save_model(
                    proto,
                    str(tmp_model),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=data_name,
                    # Every initializer: with onnx's default (1 KiB) small models wrote no .data file.
                    size_threshold=0,
                )
                if (tmp_dir / data_name).exists():
                    os.replace(tmp_dir / data_name, path.parent / data_name)
            else:
                onnx.save_model(proto, str(tmp_model))
            os.replace(tmp_model, path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return path

    def copy(self) -> Model:
        """A deep copy (graph and metadata), independent of this one.

        Copies the graph objects and every loaded weight array rather than exporting and
        re-importing a protobuf (which costs a full serialization per copy: passes copy
        often, and on an 11 M-parameter model that was a third of a pass's time).
        """
        graph = self.graph.copy()
        for t in _constants(graph):
            # graphsurgeon's copy shares weight arrays; a pass that edits one in place must
            # not change the original. Lazily loaded values give a fresh array on load.
            if isinstance(t._values, np.ndarray):  # noqa: SLF001
                t.values = t._values.copy()  # noqa: SLF001
        for node in _all_gs_nodes(graph):
            node.attrs = {k: _copy_attr(v) for k, v in node.attrs.items()}
        meta = onnx.ModelProto()
        meta.CopyFrom(self._meta)
        return Model(graph, meta, self.source)

    def fingerprint(self) -> str:
        """SHA-256 of the serialized model: a cache key for whatever depends on it."""
        h = hashlib.sha256()
        proto = self.to_proto()
        for t in proto.graph.initializer:
            h.update(t.raw_data)
            t.ClearField("raw_data")
        h.update(proto.SerializeToString(deterministic=True))
        return h.hexdigest()

    # ------------------------------------------------------------------ graph access
    @property
    def nodes(self) -> list[Node]:
        return self.graph.nodes

    @property
    def inputs(self) -> list[Variable]:
        return self.graph.inputs

    @property
    def outputs(self) -> list[Variable]:
        return self.graph.outputs

    @property
    def opset(self) -> int:
        """Version of the default (ai.onnx) operator set."""
        return int(self.graph.opset)

    def node(self, name: str) -> Node:
        """The node called `name`; KeyError if there is none."""
        for n in self.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r}")

    def tensor(self, name: str) -> Tensor:
        """The tensor called `name`; KeyError if there is none."""
        tensors = self.graph.tensors()
        if name not in tensors:
            raise KeyError(f"no tensor named {name!r}")
        return tensors[name]

    def tensors(self) -> dict[str, Tensor]:
        return self.graph.tensors()

    @staticmethod
    def producer(tensor: Tensor) -> Node | None:
        """The node that computes `tensor`, or None for inputs and constants."""
        return tensor.inputs[0] if tensor.inputs else None

    @staticmethod
    def consumers(tensor: Tensor) -> list[Node]:
        """The nodes that read `tensor`."""
        return list(tensor.outputs)

    def is_graph_output(self, tensor: Tensor) -> bool:
        return any(t is tensor for t in self.graph.outputs)

    def is_graph_input(self, tensor: Tensor) -> bool:
        return any(t is tensor for t in self.graph.inputs)

    @staticmethod
    def constant_value(tensor: Tensor) -> np.ndarray | None:
        """The value of `tensor` if it is an initializer or a Constant node's output.

        Identity chains over a constant count as that constant: exporters emit them for
        shared or tied parameters (a BatchNorm's scale, a tied embedding).
        """
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        prod = tensor.inputs[0] if tensor.inputs else None
        while prod is not None and prod.op == "Identity" and prod.inputs:
            source = prod.inputs[0]
            if isinstance(source, gs.Constant):
                return np.asarray(source.values)
            prod = source.inputs[0] if source.inputs else None
        if prod is not None and prod.op == "Constant" and not prod.inputs:
            attrs = prod.attrs
            if "value" in attrs:
                value = attrs["value"]
                return np.asarray(value.values if isinstance(value, gs.Constant) else value)
            for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
                if key in attrs:
                    return np.asarray(attrs[key], dtype=dtype)
            for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
                if key in attrs:
                    return np.asarray(list(attrs[key]), dtype=dtype)
        return None

    def unique_name(self, hint: str) -> str:
        """A node or tensor name not yet used in the graph, derived from `hint`."""
        if self._names is None:
            self._names = set(self.graph.tensors()) | {n.name for n in self.graph.nodes}
        name, i = hint, 1
        while name in self._names:
            name = f"{hint}_{i}"
            i += 1
        self._names.add(name)
        return name

    def add_constant(self, hint: str, value: np.ndarray) -> Constant:
        """A new initializer holding `value` (not yet used by any node)."""
        return gs.Constant(self.unique_name(hint), np.ascontiguousarray(value))

    def add_node(
        self,
        op: str,
        inputs: Sequence[Tensor],
        *,
        name: str,
        attrs: dict | None = None,
        outputs: Sequence[Tensor] | None = None,
        dtype=None,
        domain: str = "",
    ) -> Node:
        """Appends a node; creates one fresh output Variable when `outputs` is None.

        Call :meth:`toposort` once the rewrite is complete.
        """
        node_name = self.unique_name(name)
        if outputs is None:
            outputs = [gs.Variable(self.unique_name(f"{node_name}_out"), dtype=dtype)]
        node = gs.Node(
            op,
            node_name,
            attrs=dict(attrs or {}),
            inputs=list(inputs),
            outputs=list(outputs),
            domain=domain,
        )
        self.graph.nodes.append(node)
        return node

    def replace_uses(self, old: Tensor, new: Tensor) -> None:
        """Makes every reader of `old` read `new` instead.

        When `old` is a graph output, the output keeps its name: `new` takes it over
        (the model's interface never changes).
        """
        for consumer in list(old.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is old:
                    consumer.inputs[i] = new
        for i, t in enumerate(self.graph.outputs):
            if t is old:
                if (
                    self.is_graph_input(new)
                    or self.is_graph_output(new)
                    or isinstance(new, gs.Constant)
                ):
                    # Cannot rename: keep an explicit Identity so the output name survives.
                    ident = gs.Node(
                        "Identity", self.unique_name(f"{old.name}_keep"), inputs=[new], outputs=[]
                    )
                    old.inputs.clear()
                    ident.outputs.append(old)
                    self.graph.nodes.append(ident)
                else:
                    name = old.name
                    old.name = self.unique_name(f"{name}_replaced")
                    new.name = name
                    if new.shape is None and old.shape is not None:
                        new.shape = old.shape
                    if new.dtype is None:
                        new.dtype = old.dtype
                    self.graph.outputs[i] = new

    def bypass(self, node: Node, keep: int = 0) -> None:
        """Removes a node whose output equals its input `keep`, rewiring its readers."""
        src, dst = node.inputs[keep], node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        self.replace_uses(dst, src)
        self.graph.nodes.remove(node)

    def remove_nodes(self, nodes: Iterable[Node]) -> None:
        """Drops nodes (their outputs must be unused by then; cleanup() checks nothing)."""
        doomed = {id(n) for n in nodes}
        for n in self.graph.nodes:
            if id(n) in doomed:
                n.inputs.clear()
                n.outputs.clear()
        self.graph.nodes = [n for n in self.graph.nodes if id(n) not in doomed]

    def cleanup(self) -> Model:
        """Removes nodes and initializers that no graph output depends on, then sorts."""
        self.graph.cleanup(remove_unused_graph_inputs=False)
        self.graph.toposort()
        self._names = None
        return self

    def toposort(self) -> Model:
        self.graph.toposort()
        return self

    # ------------------------------------------------------------------ shapes
    def infer_shapes(self) -> Model:
        """Runs ONNX shape inference and records shapes and dtypes on the graph's tensors.

        Large initializers are stripped before inference (their dims suffice), so this
        works for models beyond the 2 GiB protobuf limit.
        """
        proto = self._skeleton_proto()
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
        except Exception as e:
            raise UnsupportedModelError(
                f"shape inference failed on {self.source}: {_first_line(e)}"
            ) from e
        tensors = self.graph.tensors()
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            t = tensors.get(vi.name)
            if t is None or isinstance(t, gs.Constant) or not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            if tt.elem_type:
                t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if tt.HasField("shape"):
                t.shape = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in tt.shape.dim
                ]
        return self

    def _skeleton_proto(self) -> onnx.ModelProto:
        """The model as a ModelProto whose large initializers carry dims and type only:
        enough for shape inference, without serializing the weights."""
        graph = self.graph.copy()
        for t in _constants(graph):
            shape = tuple(int(d) for d in t.shape)
            if int(np.prod(shape, dtype=np.int64)) <= _SKELETON_MAX_ELEMENTS:
                continue
            empty = onnx.TensorProto(name=t.name, dims=shape)
            empty.data_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
            t._values = gs.ir.tensor.LazyValues(empty)  # noqa: SLF001
        return Model(graph, self._meta, self.source).to_proto()

    @staticmethod
    def shape(tensor: Tensor) -> list[int | str | None] | None:
        """The tensor's shape as inferred: ints, symbolic names, None for unknown dims."""
        if isinstance(tensor, gs.Constant):
            return list(tensor.shape)
        return None if tensor.shape is None else list(tensor.shape)

    def static_shape(self, tensor: Tensor, *, batch: int = 1) -> tuple[int, ...]:
        """The tensor's shape with a symbolic leading (batch) dimension set to `batch`.

        Raises:
            DynamicShapeError: any other dimension is symbolic or unknown.
        """
        shape = self.shape(tensor)
        if shape is None:
            raise DynamicShapeError(
                f"tensor {tensor.name!r} has no inferred shape; give static input shapes"
            )
        dims = []
        for axis, d in enumerate(shape):
            if isinstance(d, (int, np.integer)) and d > 0:
                dims.append(int(d))
            elif axis == 0:
                dims.append(batch)
            else:
                raise DynamicShapeError(
                    f"tensor {tensor.name!r} has dynamic dimension {d!r} at axis {axis}; "
                    "fix the input shapes (for example --input-shape x=1,3,224,224)"
                )
        return tuple(dims)

    def set_input_shapes(self, shapes: dict[str, Sequence[int]]) -> Model:
        """Fixes graph input shapes (replacing symbolic dims) and re-runs shape inference."""
        by_name = {t.name: t for t in self.graph.inputs}
        for name, dims in shapes.items():
            if name not in by_name:
                known = ", ".join(by_name) or "none"
                raise DynamicShapeError(
                    f"--input-shape names {name!r}, but the model's inputs are: {known}"
                )
            t = by_name[name]
            if t.shape is not None and len(t.shape) != len(dims):
                raise DynamicShapeError(
                    f"input {name!r} has rank {len(t.shape)}, but the given shape {list(dims)} has rank {len(dims)}"
                )
            t.shape = [int(d) for d in dims]
        # Intermediate shapes derived from the old symbolic dims must be recomputed.
        for t in self.graph.tensors().values():
            if (
                isinstance(t, gs.Variable)
                and not self.is_graph_input(t)
                and not self.is_graph_output(t)
            ):
                t.shape = None
        return self.infer_shapes()

    def __repr__(self) -> str:
        return f"Model({self.source!r}, {len(self.graph.nodes)} nodes, opset {self.opset})"


# ---------------------------------------------------------------------- helpers
def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0].strip()


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{label} is empty")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(
            f"{label} is not an ONNX model (the protobuf does not parse: {_first_line(e)})"
        ) from e
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(
            f"{label} is not an ONNX model (no graph or no opset; truncated or not ONNX)"
        )
    return proto


def _check_proto(proto: onnx.ModelProto, label: str, path: Path | None = None) -> None:
    domains = {op.domain for op in proto.opset_import}
    local = {(f.domain, f.name) for f in proto.functions}
    for node in _all_nodes(proto.graph):
        if node.domain not in SUPPORTED_DOMAINS and (node.domain, node.op_type) not in local:
            raise UnsupportedModelError(
                f"{label}: node {node.name or node.op_type!r} uses operator {node.op_type!r} from domain "
                f"{node.domain!r}, which tailor does not support (supported: ai.onnx, ai.onnx.ml)"
            )
    if not any(d in ("", "ai.onnx") for d in domains):
        raise UnsupportedModelError(f"{label} imports no ai.onnx opset")
    try:
        # Checked before external data is read, so the proto stays far below 2 GiB.
        onnx.checker.check_model(proto if path is None else str(path))
    except onnx.checker.ValidationError as e:
        raise ModelLoadError(f"{label} is not a valid ONNX model: {_first_line(e)}") from e


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _check_external_paths(proto: onnx.ModelProto, base_dir: Path, label: str) -> None:
    """Refuses external-data locations outside the model's folder (path traversal)."""
    base = base_dir.resolve()
    for tensor in external_data_helper._get_all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or Path(location).drive:
            raise ModelLoadError(
                f"{label}: tensor {tensor.name!r} has an unsafe external data location {location!r}"
            )
        target = (base / location).resolve()
        if base not in target.parents:
            raise ModelLoadError(
                f"{label}: tensor {tensor.name!r} points outside the model's folder ({location!r}); refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{label}: external data file {location!r} of tensor {tensor.name!r} is missing"
            )


def _name_nodes(graph: gs.Graph) -> None:
    """Gives every node a unique name: selectors, plans and reports refer to nodes by name."""
    taken = {n.name for n in graph.nodes if n.name}
    seen: set[str] = set()
    counters: dict[str, int] = {}
    for node in graph.nodes:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or node.op
        i = counters.get(base, 0)
        while f"{base}_{i}" in taken or f"{base}_{i}" in seen:
            i += 1
        counters[base] = i + 1
        node.name = f"{base}_{i}"
        seen.add(node.name)
    # graphsurgeon gives an unset domain (what most exporters write) as None: normalised
    # to "" so that passes can compare domains without knowing that.
    for node in graph.nodes:
        if node.domain is None:
            node.domain = ""


def _has_external_data(proto: onnx.ModelProto) -> bool:
    return any(
        external_data_helper.uses_external_data(t)
        for t in external_data_helper._get_all_tensors(proto)
    )


def over_protobuf_limit(proto: onnx.ModelProto, limit: int = (1 << 31) - 1) -> bool:
    """Whether `proto` serializes to more than `limit` bytes. Cheap for models far from
    the limit: the initializers' payload decides, and `ByteSize` (which walks the whole
    message, ~0.1 s on a 45 MB model) runs only near it."""
    tensors = list(proto.graph.initializer) + [
        a.t for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR
    ]
    # Declared size (elements x 8 bytes bounds every numeric storage, raw or typed).
    payload = sum(8 * int(np.prod(t.dims, dtype=np.int64)) for t in tensors)
    if payload < limit - (64 << 20):
        return False
    return proto.ByteSize() > limit


def _weight_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def _all_gs_nodes(graph: gs.Graph) -> Iterable[gs.Node]:
    """Every node of `graph` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.nodes:
        yield node
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                yield from _all_gs_nodes(attr)


def _constants(graph: gs.Graph) -> Iterable[gs.Constant]:
    """Every Constant of `graph` and its subgraphs, once each."""
    seen: set[int] = set()
    tensors = [t for node in _all_gs_nodes(graph) for t in node.inputs] + list(graph.outputs)
    for t in tensors:
        if isinstance(t, gs.Constant) and id(t) not in seen:
            seen.add(id(t))
            yield t


def _copy_attr(value: object) -> object:
    """Attribute values that can be edited in place (arrays, lists, tensors), copied."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, list):
        return list(value)
    if isinstance(value, gs.Constant):
        copied = value.copy()
        if isinstance(copied._values, np.ndarray):  # noqa: SLF001
            copied.values = copied._values.copy()  # noqa: SLF001
        return copied
    return value
