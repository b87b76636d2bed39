"""The tensor graph of an ONNX model, with the same queries as the Keras ModelGraph, so cuts, partitions and the
planner treat both alike. Needs `onnx` only (no TensorFlow, no runtime).

Tensors are the ONNX value names. Initializers (and Constant nodes, folded into initializers) are weights: a part
carries the ones its nodes read, they are never cut points. A node is named after its ONNX name, or
`<op_type>_<index>` when it has none, with `@k` added to repeats, so partitions and plans name nodes the same way in
every process. A node holding subgraphs (If, Loop, Scan) depends on the outer values its subgraphs read too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from splitinfer.dag import Dag, DagQueries
from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.tensors import TensorInfo, random_array

MIN_OPSET = 7  # older default-domain opsets predate what the runtimes still load


@dataclass
class OnnxNode:
    name: str
    op_type: str
    inputs: list[str]     # the values it reads: its inputs (weights excluded), then what its subgraphs read
    outputs: list[str]
    weights: list[str] = field(default_factory=list)  # initializers it reads (subgraphs' included)
    proto: onnx.NodeProto | None = field(default=None, repr=False, compare=False)
    is_input: bool = False

    @property
    def unique_inputs(self) -> list[str]:
        return list(dict.fromkeys(self.inputs))

    @property
    def results(self) -> list[str]:
        return list(self.outputs)


def load_onnx_model(path: str | Path, input_shape: tuple[int, ...] | None = None) -> onnx.ModelProto:
    """An ONNX file, checked (structure, opset, every op known) and with its shapes inferred; SplitError in one
    line otherwise. `input_shape` fixes the free non-batch dimensions of its single input."""
    path = Path(path)
    if not path.exists():
        raise SplitError(f"model file not found: {path}")
    if not path.is_file():
        raise SplitError(f"{path} is not an ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: a truncated or foreign file
        raise SplitError(f"{path} is not a valid ONNX file ({_first_line(exc) or 'cannot be parsed'})") from None
    if not model.graph.node:
        raise SplitError(f"{path} is not a valid ONNX file (its graph has no operations)")
    if input_shape is not None:
        _fix_input_shape(model, tuple(input_shape), str(path))
    return check_onnx_model(model, str(path))


def _fix_input_shape(model: onnx.ModelProto, shape: tuple[int, ...], label: str) -> None:
    weights = {w.name for w in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in weights]
    if len(inputs) != 1:
        raise SplitError(f"--input-shape sets the shape of a single input; {label} has {len(inputs)} inputs")
    dims = inputs[0].type.tensor_type.shape.dim
    declared = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)[1:]
    if len(declared) != len(shape) or any(d is not None and d != s for d, s in zip(declared, shape)):
        raise SplitError(f"{label} takes inputs of shape {declared}, not {shape}")
    for d, size in zip(list(dims)[1:], shape):
        d.dim_value = size
    del model.graph.value_info[:]


def check_onnx_model(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if default and default[0] < MIN_OPSET:
        raise SplitError(f"{label} uses ONNX opset {default[0]}; opset {MIN_OPSET} or newer is needed")
    if default and default[0] > onnx.defs.onnx_opset_version():
        raise SplitError(f"{label} uses ONNX opset {default[0]}; the installed onnx {onnx.__version__} knows opsets "
                         f"up to {onnx.defs.onnx_opset_version()}")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - ValidationError, InferenceError: say the checker's first line
        raise SplitError(f"{label} fails the ONNX checker: {_first_line(exc)}") from None
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        raise SplitError(f"{label}: ONNX shape inference fails: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes of the main graph as initializers: weights, carried by whichever part reads them."""
    graph = model.graph
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            value = _constant_value(node)
            if value is not None:
                value.name = node.output[0]
                graph.initializer.append(value)
                continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            return onnx.TensorProto.FromString(attr.t.SerializeToString())
        dtype = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                 "value_ints": np.int64}.get(attr.name)
        if dtype is not None:
            return numpy_helper.from_array(np.asarray(helper.get_attribute_value(attr), dtype=dtype))
    return None  # sparse or string constants stay nodes


def subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """Outer-scope values a node's subgraphs read (names they use but do not define)."""
    reads: list[str] = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {i.name for i in g.initializer}
            for inner in g.node:
                for t in [*inner.input, *subgraph_reads(inner)]:
                    if t and t not in defined:
                        reads.append(t)
                defined.update(inner.output)
    return list(dict.fromkeys(reads))


def _dims(value: onnx.ValueInfoProto) -> tuple | None:
    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not ttype.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim)


def _dtype(value: onnx.ValueInfoProto) -> str | None:
    elem = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
    if not elem:
        return None
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError):
        return None
    return str(dtype) if dtype.kind in "biuf" else None


class OnnxGraph(DagQueries):
    """Nodes in topological order, tensors with producer and consumers, the model's inputs and outputs."""

    def __init__(self, model: onnx.ModelProto, name: str | None = None):
        self.model = fold_constants(model)
        graph = self.model.graph
        self.name = name or graph.name or "onnx_model"
        self.output_keys = None
        self.weights = {w.name: w for w in graph.initializer}
        self.nodes: dict[str, OnnxNode] = {}
        self.tensors: dict[str, TensorInfo] = {}
        infos = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
        self.inputs = [v.name for v in graph.input if v.name not in self.weights]
        self.outputs = [v.name for v in graph.output]
        used: set[str] = set()

        def unique(base: str) -> str:
            name, k = base, 0
            while name in used:
                k += 1
                name = f"{base}@{k}"
            used.add(name)
            return name

        for t in self.inputs:
            name = unique(t)
            self.nodes[name] = OnnxNode(name, "Input", [], [t], is_input=True)
            self._add_tensor(t, infos.get(t), name)
        produced = set(self.inputs)
        for i, proto in enumerate(graph.node):
            reads = [t for t in [*proto.input, *subgraph_reads(proto)] if t]
            name = unique(proto.name or f"{proto.op_type}_{i}")
            node = OnnxNode(name, proto.op_type, [t for t in reads if t not in self.weights],
                            [t for t in proto.output if t], [t for t in reads if t in self.weights], proto)
            missing = [t for t in node.inputs if t not in produced]
            if missing:
                raise SplitError(f"{self.name}: node {name} reads {missing[0]!r}, which no earlier node produces "
                                 "(the graph is not topologically sorted or not connected)")
            self.nodes[name] = node
            for t in node.outputs:
                self._add_tensor(t, infos.get(t), name)
                produced.add(t)
        missing = [t for t in self.outputs if t not in produced and t not in self.weights]
        if missing:
            raise SplitError(f"{self.name}: output {missing[0]!r} is produced by no node")
        if any(t in self.weights for t in self.outputs):
            raise SplitError(f"{self.name}: output {next(t for t in self.outputs if t in self.weights)!r} is a "
                             "constant; nothing to compute for it")
        self._fill_unknown_types()
        for node in self.nodes.values():
            for t in node.unique_inputs:
                self.tensors[t].consumers.append(node.name)
        self.dag = Dag([(n, node.unique_inputs, node.outputs) for n, node in self.nodes.items()],
                       self.inputs, self.outputs)

    def _add_tensor(self, t: str, info: onnx.ValueInfoProto | None, producer: str) -> None:
        shape = _dims(info) if info is not None else None
        dtype = _dtype(info) if info is not None else None
        self.tensors[t] = TensorInfo(t, shape if shape is not None else (), dtype or "", producer)

    def _fill_unknown_types(self) -> None:
        """Tensors shape inference left untyped (ops it cannot see through): their dtype and rank from one run of
        the model on ONNX Runtime with them as outputs; dimensions stay unknown. Only tensors a cut could hand
        over matter; a tensor of a non-numeric type is refused where it would be cut, not here."""
        unknown = [t for t, info in self.tensors.items() if not info.dtype]
        if not unknown:
            return
        import onnxruntime as ort  # the runtime only when inference fell short

        probe = onnx.ModelProto.FromString(self.model.SerializeToString())
        probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in unknown if t not in self.outputs)
        try:
            session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            rng = np.random.default_rng(0)
            feeds = {t: random_array(rng, [d or 1 for d in self.tensors[t].shape], self.tensors[t].dtype or "float32")
                     for t in self.inputs}
            names = [o.name for o in session.get_outputs()]
            values = dict(zip(names, session.run(names, feeds)))
        except Exception as exc:  # noqa: BLE001
            raise SplitError(f"{self.name}: cannot find the type of {unknown[0]!r}: {_first_line(exc)}") from None
        for t in unknown:
            value = values.get(t)
            if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                self.tensors[t].dtype = str(value.dtype)
                self.tensors[t].shape = (None,) * value.ndim
            else:
                self.tensors[t].dtype = "object"

    # -- queries, as ModelGraph's --------------------------------------------------------------
    @property
    def compute_nodes(self) -> list[str]:
        return [n for n, node in self.nodes.items() if not node.is_input]

    @property
    def input_nodes(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.is_input]

    def cut_points(self) -> list[str]:
        return [t for t in self.dag.cut_points(outputs_from_last_part=False) if self.tensors[t].dtype != "object"]

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            close = [t for t in self.tensors if t.lower().startswith(name.lower()[:8])]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SplitError(f"unknown tensor {name!r}{hint}") from None

    @cached_property
    def model_hash(self) -> str:
        """sha256 of the graph and its weights as loaded (before shape inference added value infos)."""
        h = hashlib.sha256()
        bare = onnx.ModelProto.FromString(self.model.SerializeToString())
        del bare.graph.value_info[:]
        h.update(bare.SerializeToString(deterministic=True))
        return h.hexdigest()
