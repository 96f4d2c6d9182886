"""Load an ONNX model and view it as a graph of nodes joined by tensors.

:class:`ModelGraph` is the planner's read-only picture of a model: the
shape-inferred ``ModelProto``, a ``networkx.DiGraph`` whose vertices are node
names and whose edges carry the tensor flowing between them, the model's
input/output :class:`TensorSpec` lists, and which tensors are
*constant-derived* (computed from initializers and constants only, so they never
have to cross the network: an extractor recomputes them on whichever side
needs them).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx
from onnx import helper, shape_inference

from splitgate.codec import datatype_of
from splitgate.errors import InvalidArgument, SplitgateError

__all__ = ["TensorSpec", "ModelGraph", "datatype_of_elem_type"]

# Ops whose output changes from run to run: never treat them as constants,
# since recomputing them on each side of a cut would give different values.
_NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
# ONNX element types with no numpy equivalent in splitgate.codec.
_SPECIAL_DATATYPES = {
    onnx.TensorProto.STRING: "BYTES",
    onnx.TensorProto.BFLOAT16: "BF16",
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, Open Inference Protocol datatype and shape of a tensor.

    Attributes:
        name: tensor name in the ONNX graph.
        datatype: OIP datatype name ("FP32", "INT64", ...; "BYTES" for strings).
        shape: dimensions; -1 marks a dynamic or unknown dimension. An empty
            list is a scalar (or a tensor whose rank is unknown).
    """

    name: str
    datatype: str
    shape: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form ``{"name", "datatype", "shape"}``."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        """Build a spec from its JSON form (see :meth:`to_dict`)."""
        return cls(str(data["name"]), str(data["datatype"]), [int(d) for d in data["shape"]])

    def nbytes(self) -> int | None:
        """Bytes of one tensor with dynamic dims counted as 1; None if not fixed-size."""
        from splitgate.codec import DATATYPES

        dtype = DATATYPES.get(self.datatype)
        if dtype is None:
            return None
        n = dtype.itemsize
        for d in self.shape:
            n *= d if d > 0 else (0 if d == 0 else 1)
        return n


def datatype_of_elem_type(elem_type: int) -> str | None:
    """Return the OIP datatype name of an ONNX ``TensorProto`` element type, or None."""
    if elem_type in _SPECIAL_DATATYPES:
        return _SPECIAL_DATATYPES[elem_type]
    try:
        return datatype_of(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError, SplitgateError):
        return None


def spec_of_value_info(vi: onnx.ValueInfoProto) -> TensorSpec | None:
    """Return the :class:`TensorSpec` of a tensor-typed value info, or None if untyped."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.elem_type:
        return None
    tt = vi.type.tensor_type
    datatype = datatype_of_elem_type(tt.elem_type)
    if datatype is None:
        return None
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else -1 for d in tt.shape.dim]
    return TensorSpec(vi.name, datatype, shape)


def has_full_type(vi: onnx.ValueInfoProto | None) -> bool:
    """True if a value info carries a tensor element type and a shape (rank known)."""
    return (
        vi is not None
        and vi.type.HasField("tensor_type")
        and vi.type.tensor_type.elem_type != 0
        and vi.type.tensor_type.HasField("shape")
    )


def _subgraph_outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a control-flow node's subgraphs read from the enclosing scope."""
    outer: set[str] = set()

    def visit(graph: onnx.GraphProto, bound: set[str]) -> None:
        local = set(bound)
        local.update(i.name for i in graph.input)
        local.update(t.name for t in graph.initializer)
        local.update(t.values.name for t in graph.sparse_initializer)
        for n in graph.node:
            for name in n.input:
                if name and name not in local:
                    outer.add(name)
            for sub in _subgraphs(n):
                visit(sub, local)
            local.update(o for o in n.output if o)

    for sub in _subgraphs(node):
        visit(sub, set())
    return outer


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _infer(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Shape-infer ``model`` (loaded without external data); fall back to it unchanged.

    Tries in-memory inference with data propagation, then without, then the
    path-based variant (which also handles protos over 2 GB).
    """
    for data_prop in (True, False):
        try:
            return shape_inference.infer_shapes(model, data_prop=data_prop)
        except Exception:  # noqa: BLE001 - inference is best effort
            continue
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "inferred.onnx"
            shape_inference.infer_shapes_path(os.fspath(path), os.fspath(out))
            return onnx.load(os.fspath(out), load_external_data=False)
    except Exception:  # noqa: BLE001
        return model


class ModelGraph:
    """A shape-inferred ONNX model viewed as a DAG of nodes.

    Build one with :meth:`load` (from a file) or :meth:`from_model` (from a
    ``ModelProto``). Unnamed or duplicate-named nodes are given stable unique
    names (``"<op_type>_<position>"``) in :attr:`model` itself, so sub-models
    extracted later carry the same names. Nodes are kept in topological order.

    Attributes:
        model: the shape-inferred ``ModelProto`` (external data loaded inline).
        graph: ``networkx.DiGraph``; vertices are node names with attributes
            ``op_type``, ``index`` (topological position) and ``const`` (all its
            outputs are constant-derived); an edge u -> v has attribute
            ``tensor`` (the first tensor u passes to v) and ``tensors`` (all).
        inputs: the model's real inputs (graph inputs that are not initializers).
        outputs: the model's outputs.
        source: the file the model was loaded from, if any.
    """

    def __init__(self, model: onnx.ModelProto, *, source: Path | None = None) -> None:
        """Wrap an already shape-inferred model. Prefer :meth:`load` / :meth:`from_model`."""
        self.model = model
        self.source = source
        g = model.graph
        self._name_nodes()
        self.initializers: set[str] = {t.name for t in g.initializer} | {
            t.values.name for t in g.sparse_initializer
        }
        self._value_info: dict[str, onnx.ValueInfoProto] = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            self._value_info[vi.name] = vi
        self.input_names: list[str] = [i.name for i in g.input if i.name not in self.initializers]
        self.output_names: list[str] = [o.name for o in g.output]

        self._nodes: dict[str, onnx.NodeProto] = {}
        self._node_inputs: dict[str, list[str]] = {}
        self.producer: dict[str, str] = {}
        for node in g.node:
            self._nodes[node.name] = node
            ins = [i for i in node.input if i]
            ins += sorted(_subgraph_outer_names(node) - set(ins))
            self._node_inputs[node.name] = ins
            for out in node.output:
                if out:
                    self.producer[out] = node.name

        self.consumers: dict[str, list[str]] = {}
        dg = nx.DiGraph()
        for node in g.node:
            dg.add_node(node.name, op_type=node.op_type)
        for node in g.node:
            for t in self._node_inputs[node.name]:
                self.consumers.setdefault(t, []).append(node.name)
                src = self.producer.get(t)
                if src is None:
                    continue
                if dg.has_edge(src, node.name):
                    data = dg.edges[src, node.name]
                    if t not in data["tensors"]:
                        data["tensors"] = (*data["tensors"], t)
                else:
                    dg.add_edge(src, node.name, tensor=t, tensors=(t,))
        if not nx.is_directed_acyclic_graph(dg):
            raise InvalidArgument("model graph has a cycle; not a valid ONNX model")
        position = {node.name: i for i, node in enumerate(g.node)}
        order = list(nx.lexicographical_topological_sort(dg, key=position.__getitem__))
        if order != [n.name for n in g.node]:
            # Keep the proto itself topologically sorted (the ONNX spec requires it).
            nodes = [self._nodes[n] for n in order]
            del g.node[:]
            g.node.extend(nodes)
        self.order: list[str] = order
        for i, name in enumerate(order):
            dg.nodes[name]["index"] = i
        self.graph: nx.DiGraph = dg
        self.constant_tensors: frozenset[str] = self._find_constants()
        for name in order:
            outs = [o for o in self._nodes[name].output if o]
            dg.nodes[name]["const"] = bool(outs) and all(o in self.constant_tensors for o in outs)
        self.inputs: list[TensorSpec] = [self._io_spec(n) for n in self.input_names]
        self.outputs: list[TensorSpec] = [self._io_spec(n) for n in self.output_names]

    # -- construction -------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, infer_shapes: bool = True) -> ModelGraph:
        """Load an ONNX file (external data included) and shape-infer it.

        Args:
            path: the ``.onnx`` file; external data files are resolved relative to it.
            infer_shapes: run ONNX shape inference (falls back silently if it fails).

        Returns:
            The model graph.

        Raises:
            InvalidArgument: the file is missing or not a loadable ONNX model.
        """
        p = Path(path)
        if not p.is_file():
            raise InvalidArgument(f"model file not found: {p}")
        try:
            model = onnx.load(os.fspath(p), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises various types
            raise InvalidArgument(f"{p} is not a loadable ONNX model: {exc}") from exc
        if infer_shapes:
            model = _infer(model, p)
        try:
            onnx.load_external_data_for_model(model, os.fspath(p.parent))
        except Exception as exc:  # noqa: BLE001
            raise InvalidArgument(f"cannot load external data of {p}: {exc}") from exc
        return cls(model, source=p)

    @classmethod
    def from_model(cls, model: onnx.ModelProto, *, infer_shapes: bool = True) -> ModelGraph:
        """Build a graph from an in-memory model (copied; the argument is not modified)."""
        m = onnx.ModelProto()
        m.CopyFrom(model)
        if infer_shapes:
            try:
                m = shape_inference.infer_shapes(m, data_prop=True)
            except Exception:  # noqa: BLE001 - best effort
                pass
        return cls(m)

    def _name_nodes(self) -> None:
        seen: set[str] = set()
        taken = {n.name for n in self.model.graph.node if n.name}
        for i, node in enumerate(self.model.graph.node):
            if not node.name or node.name in seen:
                base = f"{node.op_type}_{i}"
                name, k = base, 1
                while name in taken or name in seen:
                    name, k = f"{base}_{k}", k + 1
                node.name = name
                taken.add(name)
            seen.add(node.name)

    def _find_constants(self) -> frozenset[str]:
        const: set[str] = set(self.initializers)
        for name in self.order:
            node = self._nodes[name]
            if node.op_type in _NONDETERMINISTIC:
                continue
            if all(t in const for t in self._node_inputs[name]):
                const.update(o for o in node.output if o)
        return frozenset(const)

    def _io_spec(self, name: str) -> TensorSpec:
        spec = self.tensor_spec(name)
        return spec if spec is not None else TensorSpec(name, "BYTES", [])

    # -- queries --------------------------------------------------------------

    @property
    def total_nodes(self) -> int:
        """Number of nodes in the (top-level) graph."""
        return len(self.order)

    @property
    def opset(self) -> int:
        """Version of the default ONNX domain ("" / "ai.onnx") the model imports."""
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return int(imp.version)
        return 0

    def node(self, name: str) -> onnx.NodeProto:
        """Return the NodeProto named ``name`` (KeyError if absent)."""
        return self._nodes[name]

    def nodes(self) -> Iterable[onnx.NodeProto]:
        """NodeProtos in topological order."""
        return (self._nodes[n] for n in self.order)

    def node_inputs(self, name: str) -> list[str]:
        """Tensors a node reads, including names its subgraphs take from outer scope."""
        return self._node_inputs[name]

    def node_outputs(self, name: str) -> list[str]:
        """Non-empty output tensor names of a node."""
        return [o for o in self._nodes[name].output if o]

    def is_constant(self, tensor: str) -> bool:
        """True if ``tensor`` is computed from initializers/constants only."""
        return tensor in self.constant_tensors

    def value_info(self, tensor: str) -> onnx.ValueInfoProto | None:
        """The value info shape inference (or the model) gives a tensor, if any.

        Initializers without a value info get one built from the tensor itself.
        """
        vi = self._value_info.get(tensor)
        if vi is None and tensor in self.initializers:
            for init in self.model.graph.initializer:
                if init.name == tensor:
                    vi = helper.make_tensor_value_info(tensor, init.data_type, list(init.dims))
                    self._value_info[tensor] = vi
                    break
        return vi

    def set_value_info(self, vi: onnx.ValueInfoProto) -> None:
        """Record (or replace) the value info of an intermediate tensor in :attr:`model`."""
        graph = self.model.graph
        for i, existing in enumerate(graph.value_info):
            if existing.name == vi.name:
                graph.value_info[i].CopyFrom(vi)
                break
        else:
            if vi.name not in self.input_names and vi.name not in self.output_names:
                graph.value_info.append(vi)
        self._value_info[vi.name] = vi

    def tensor_spec(self, tensor: str) -> TensorSpec | None:
        """The :class:`TensorSpec` of a tensor, or None if its type is unknown."""
        vi = self.value_info(tensor)
        return spec_of_value_info(vi) if vi is not None else None

    def __repr__(self) -> str:
        src = f" from {self.source}" if self.source else ""
        return (
            f"<ModelGraph{src}: {self.total_nodes} nodes, "
            f"inputs={[i.name for i in self.inputs]}, outputs={[o.name for o in self.outputs]}>"
        )


def dummy_inputs(inputs: list[TensorSpec], *, dynamic: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded arrays matching ``inputs`` with dynamic dims set to ``dynamic``.

    Floats are standard normal; integers are zeros (safe as indices); bools False.
    """
    from splitgate.codec import numpy_dtype

    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = [d if d >= 0 else dynamic for d in spec.shape]
        dtype = numpy_dtype(spec.datatype, tensor=spec.name)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds
