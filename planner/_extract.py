"""Cut a model into a prefix (device) and a suffix (cloud) sub-model.

Like ``onnx.utils.Extractor`` — whose reachability walk this follows — but
aware of what the planner needs and the stock extractor does not do:

* nodes inside If/Loop/Scan subgraphs read outer-scope tensors: those count as
  inputs of the control-flow node, so its producers are kept;
* cut tensors that shape inference left untyped get their element type and
  rank from one onnxruntime run of the full model, every dimension left
  dynamic: a size seen at the planning shape is never written into a model;
* the sub-models carry no value infos of intermediate tensors (onnxruntime
  infers them at load), so they run at every shape the original model accepts;
* IR version < 4 models list initializers as graph inputs; so do the sub-models;
* each sub-model is checked with ``onnx.checker``.

Constant-derived nodes (weights computed by Constant / ConstantOfShape / ...)
are copied into whichever sub-model reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from splitgate.planner._graph import ModelGraph, TensorSpec, dummy_inputs, has_full_type
from splitgate.errors import BundleError, InvalidArgument

__all__ = ["Extractor", "extract_prefix", "extract_suffix"]

# Protos above this size cannot be checked in memory by onnx.checker.
_CHECK_LIMIT = 2**31 - 2**24


class Extractor:
    """Extract standalone prefix/suffix models from a :class:`ModelGraph`.

    One instance per model; it fills in missing cut-tensor types (running the
    model in onnxruntime at most once per batch of missing tensors) and records
    them in ``graph.model`` so later extractions reuse them.

    Args:
        graph: the model graph to cut.
        check: run ``onnx.checker.check_model`` on every extracted model.
        feeds: inputs to run the model on when a cut tensor's type must be
            probed (a planning shape's; default: seeded inputs, dynamic dims 1).
    """

    def __init__(self, graph: ModelGraph, *, check: bool = True, feeds: dict[str, np.ndarray] | None = None) -> None:
        self.g = graph
        self.check = check
        self.feeds = feeds

    # -- public -------------------------------------------------------------

    def prefix(self, cut_tensors: Sequence[str]) -> onnx.ModelProto:
        """The device sub-model: graph inputs -> ``cut_tensors``.

        Args:
            cut_tensors: tensors the prefix outputs (in this order).

        Returns:
            A standalone ``ModelProto`` whose inputs are the graph inputs it needs.

        Raises:
            InvalidArgument: an unknown or constant tensor name.
            BundleError: a cut tensor's type cannot be determined, or the
                extracted model fails the ONNX checker.
        """
        cut = self._validate(cut_tensors)
        nodes = self._reachable(cut, stop=set(self.g.input_names))
        used_inputs = self._consumed(nodes) | set(cut)
        inputs = [n for n in self.g.input_names if n in used_inputs]
        return self._make(nodes, inputs, cut, role="prefix")

    def suffix(self, cut_tensors: Sequence[str]) -> onnx.ModelProto:
        """The cloud sub-model: ``cut_tensors`` -> graph outputs.

        Args:
            cut_tensors: tensors the suffix takes as inputs (in this order).

        Returns:
            A standalone ``ModelProto``.

        Raises:
            InvalidArgument: unknown names, or ``cut_tensors`` do not separate the
                graph inputs from the outputs (the suffix would need another input).
            BundleError: as for :meth:`prefix`.
        """
        cut = self._validate(cut_tensors)
        stop = set(cut)
        nodes = self._reachable(self.g.output_names, stop=stop | set(self.g.input_names))
        needed = (self._consumed(nodes) | set(self.g.output_names)) - self._produced(nodes)
        leaked = sorted(t for t in needed if t in self.g.input_names and t not in stop)
        if leaked:
            raise InvalidArgument(
                f"cut {list(cut)} does not separate the model: the suffix still needs graph input(s) {leaked}"
            )
        return self._make(nodes, [t for t in cut if t in needed], list(self.g.output_names), role="suffix")

    def ensure_value_infos(self, tensors: Sequence[str]) -> None:
        """Make sure each tensor has a value info with element type and shape.

        Tensors shape inference left untyped (or without a shape) are typed by
        running the full model in onnxruntime with them as extra outputs.

        Raises:
            BundleError: onnxruntime cannot run the model and no element type is known.
        """
        missing = [t for t in tensors if not has_full_type(self.g.value_info(t))]
        if missing:
            self._probe(missing)

    def tensor_spec(self, tensor: str) -> TensorSpec:
        """Type and shape of a tensor, probing onnxruntime if needed."""
        self.ensure_value_infos([tensor])
        spec = self.g.tensor_spec(tensor)
        if spec is None:
            raise BundleError(f"tensor '{tensor}' has an element type splitgate cannot carry")
        return spec

    # -- machinery ------------------------------------------------------------

    def _validate(self, cut_tensors: Sequence[str]) -> list[str]:
        cut = list(dict.fromkeys(cut_tensors))
        if not cut:
            raise InvalidArgument("a cut needs at least one tensor")
        for t in cut:
            if t not in self.g.producer and t not in self.g.input_names:
                raise InvalidArgument(f"tensor '{t}' is not produced in the model nor a graph input")
        self.ensure_value_infos(cut)
        return cut

    def _reachable(self, targets: Sequence[str], *, stop: set[str]) -> list[str]:
        """Node names needed to compute ``targets`` from ``stop`` tensors, in topological order."""
        keep: set[str] = set()
        stack = [t for t in targets]
        seen: set[str] = set()
        while stack:
            t = stack.pop()
            if t in seen or t in stop:
                continue
            seen.add(t)
            node = self.g.producer.get(t)
            if node is None or node in keep:
                continue
            keep.add(node)
            stack.extend(self.g.node_inputs(node))
        return [n for n in self.g.order if n in keep]

    def _consumed(self, nodes: list[str]) -> set[str]:
        out: set[str] = set()
        for n in nodes:
            out.update(self.g.node_inputs(n))
        return out

    def _produced(self, nodes: list[str]) -> set[str]:
        out: set[str] = set()
        for n in nodes:
            out.update(self.g.node_outputs(n))
        return out

    def _make(self, nodes: list[str], inputs: list[str], outputs: list[str], *, role: str) -> onnx.ModelProto:
        g = self.g
        src = g.model
        used = self._consumed(nodes) | self._produced(nodes) | set(outputs)
        initializers = [t for t in src.graph.initializer if t.name in used]
        sparse = [t for t in src.graph.sparse_initializer if t.values.name in used]
        init_names = {t.name for t in initializers} | {t.values.name for t in sparse}
        in_vis = [self._vi(t) for t in inputs]
        if src.ir_version < 4:
            # IR 3: every initializer must also be declared as a graph input.
            in_vis += [self._vi(t.name) for t in initializers]
        out_vis = [self._vi(t) for t in outputs]
        graph = helper.make_graph(
            [g.node(n) for n in nodes],
            f"{src.graph.name or 'model'}-{role}",
            in_vis,
            out_vis,
            initializer=initializers,
            sparse_initializer=sparse,
        )
        model = helper.make_model(
            graph,
            ir_version=src.ir_version,
            opset_imports=list(src.opset_import),
            functions=self._functions(nodes),
            producer_name="splitgate.planner",
            producer_version=src.producer_version or "",
            domain=src.domain,
            model_version=src.model_version,
            doc_string=f"{role} of {src.graph.name or 'model'}",
        )
        if self.check and model.ByteSize() < _CHECK_LIMIT:
            try:
                onnx.checker.check_model(model)
            except onnx.checker.ValidationError as exc:
                raise BundleError(f"extracted {role} ({len(nodes)} nodes) is not a valid model: {exc}") from exc
        return model

    def _vi(self, tensor: str) -> onnx.ValueInfoProto:
        vi = self.g.value_info(tensor)
        if vi is None:
            raise BundleError(f"tensor '{tensor}' has no type information")
        out = onnx.ValueInfoProto()
        out.CopyFrom(vi)
        return out

    def _functions(self, nodes: list[str]) -> list[onnx.FunctionProto]:
        funcs = {(f.domain, f.name): f for f in self.g.model.functions}
        if not funcs:
            return []
        keep: dict[tuple[str, str], onnx.FunctionProto] = {}
        queue = [self.g.node(n) for n in nodes]
        while queue:
            node = queue.pop()
            key = (node.domain, node.op_type)
            if key in funcs and key not in keep:
                keep[key] = funcs[key]
                queue.extend(funcs[key].node)
        return [f for k, f in funcs.items() if k in keep]

    def _probe(self, tensors: list[str]) -> None:
        """Type ``tensors`` from real onnxruntime runs of the full model."""
        import onnxruntime as ort

        g = self.g
        model = onnx.ModelProto()
        model.CopyFrom(g.model)
        existing = {o.name for o in model.graph.output}
        for t in tensors:
            if t not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=t))
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = 1
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            values = sess.run(tensors, self.feeds if self.feeds is not None else dummy_inputs(g.inputs, dynamic=1))
        except Exception as exc:  # noqa: BLE001 - any ORT failure: fall back to what inference knows
            for t in tensors:
                vi = g.value_info(t)
                if vi is None or not vi.type.tensor_type.elem_type:
                    raise BundleError(
                        f"cannot determine the type of cut tensor '{t}': shape inference did not "
                        f"type it and onnxruntime could not run the model ({str(exc).splitlines()[0]})"
                    ) from exc
            return
        for t, value in zip(tensors, values):
            a = np.asarray(value)
            # rank and element type only: the sizes are those of this one run
            elem = helper.np_dtype_to_tensor_dtype(a.dtype)
            g.set_value_info(helper.make_tensor_value_info(t, elem, [None] * a.ndim))


def extract_prefix(graph: ModelGraph, cut_tensors: Sequence[str]) -> onnx.ModelProto:
    """Shortcut for ``Extractor(graph).prefix(cut_tensors)``."""
    return Extractor(graph).prefix(cut_tensors)


def extract_suffix(graph: ModelGraph, cut_tensors: Sequence[str]) -> onnx.ModelProto:
    """Shortcut for ``Extractor(graph).suffix(cut_tensors)``."""
    return Extractor(graph).suffix(cut_tensors)
