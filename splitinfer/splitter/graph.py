"""The tensor graph of a Keras model, built from its nodes (not get_config), with nested models flattened.

Every call of an operation is one graph node, the non-layer ops Keras records for `x + 3.0` included.
A node is named after its operation (`conv`), a second call of the same operation in one model gets
`conv@1`, and a node inside a nested model is prefixed with the nested model's node name (`backbone/conv`).
Every tensor is named `<node>:<output index>`; the names depend only on the model's structure, so they are
the same in every process that builds or loads the same model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from splitinfer import _tf  # noqa: F401  (quiet TF before keras imports it)
import keras
from keras import tree


class SplitError(ValueError):
    """A split that cannot be made; the message names the problem in one line."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple  # batch dimension first, None where unknown
    dtype: str
    producer: str  # node name
    consumers: list[str] = field(default_factory=list)

    def nbytes(self, batch: int = 1) -> int:
        """Bytes of this tensor for `batch` samples (unknown non-batch dims count as 1)."""
        dims = [batch if i == 0 and d is None else (d or 1) for i, d in enumerate(self.shape)]
        return int(np.prod(dims, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class GraphNode:
    name: str
    op_type: str
    inputs: list[str]  # tensor names, in the order of the call's flattened tensor arguments
    outputs: list[str]
    is_input: bool = False
    keras_node: object = field(default=None, repr=False, compare=False)
    operation: object = field(default=None, repr=False, compare=False)

    @property
    def unique_inputs(self) -> list[str]:
        return list(dict.fromkeys(self.inputs))


def _tensor_dtype(kt) -> str:
    return str(np.dtype(keras.backend.standardize_dtype(kt.dtype)))


def _functional_of(op):
    """The Functional graph behind a nested model, or None for an opaque operation."""
    from keras.src.models.functional import Functional
    from keras.src.models.sequential import Sequential

    if isinstance(op, Sequential):
        inner = getattr(op, "_functional", None)
        return inner if isinstance(inner, Functional) else None
    if isinstance(op, Functional):
        return op
    return None


class ModelGraph:
    """Nodes in topological order, tensors with producer and consumers, the model's inputs and outputs."""

    def __init__(self, model: keras.Model):
        if _functional_of(model) is None:
            raise SplitError(
                f"model {model.name!r} is not a functional or sequential model with known inputs; "
                "subclassed models have no graph to cut"
            )
        self.model = model
        self.nodes: dict[str, GraphNode] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._used_names: set[str] = set()
        functional = _functional_of(model)
        input_kts = tree.flatten(functional._inputs_struct)
        self.inputs: list[str] = []
        for kt in input_kts:
            op = kt._keras_history.operation
            name = self._unique(op.name)
            tname = f"{name}:0"
            self._add_node(GraphNode(name, type(op).__name__, [], [tname], is_input=True, operation=op), [kt])
            self.inputs.append(tname)
        mapping = {id(kt): tname for kt, tname in zip(input_kts, self.inputs)}
        outputs_struct = functional._outputs_struct
        self.output_keys: list[str] | None = (
            sorted(outputs_struct.keys()) if isinstance(outputs_struct, dict) else None
        )
        self.outputs: list[str] = self._expand(functional, "", mapping)
        self._link()

    # -- construction -------------------------------------------------------------------------

    def _unique(self, base: str) -> str:
        name, k = base, 0
        while name in self._used_names:
            k += 1
            name = f"{base}@{k}"
        self._used_names.add(name)
        return name

    def _add_node(self, node: GraphNode, output_kts) -> None:
        self.nodes[node.name] = node
        for tname, kt in zip(node.outputs, output_kts):
            self.tensors[tname] = TensorInfo(tname, tuple(kt.shape), _tensor_dtype(kt), node.name)

    def _expand(self, functional, prefix: str, mapping: dict[int, str]) -> list[str]:
        """Add the nodes of `functional` under `prefix`; `mapping` names its input tensors. Returns output names."""
        out_kts = tree.flatten(functional._outputs_struct)
        for knode in self._topological_knodes(out_kts, mapping):
            op = knode.operation
            arg_names = [mapping[id(kt)] for kt in knode.arguments.keras_tensors]
            inner = _functional_of(op)
            if inner is not None:
                sub_prefix = self._unique(prefix + op.name) + "/"
                inner_inputs = tree.flatten(inner._inputs_struct)
                if len(inner_inputs) != len(arg_names):
                    raise SplitError(
                        f"nested model {op.name!r} called with {len(arg_names)} tensors "
                        f"but has {len(inner_inputs)} inputs"
                    )
                inner_map = {id(kt): n for kt, n in zip(inner_inputs, arg_names)}
                inner_outs = self._expand(inner, sub_prefix, inner_map)
                for kt, n in zip(knode.outputs, inner_outs):
                    mapping[id(kt)] = n
                continue
            name = self._unique(prefix + op.name)
            out_names = [f"{name}:{i}" for i in range(len(knode.outputs))]
            self._add_node(
                GraphNode(name, type(op).__name__, arg_names, out_names, keras_node=knode, operation=op),
                knode.outputs,
            )
            for kt, n in zip(knode.outputs, out_names):
                mapping[id(kt)] = n
        return [mapping[id(kt)] for kt in out_kts]

    @staticmethod
    def _topological_knodes(out_kts, mapping: dict[int, str]):
        """Keras nodes reachable from the outputs, dependencies first, stopping at already-named tensors."""

        def producer(kt):
            history = getattr(kt, "_keras_history", None)
            op = getattr(history, "operation", None)
            if op is None or isinstance(op, keras.layers.InputLayer):
                raise SplitError(f"tensor {kt.name!r} is not connected to the model's inputs")
            return op._inbound_nodes[history.node_index]

        order, done = [], set()
        stack = [(kt, False) for kt in reversed(out_kts) if id(kt) not in mapping]
        while stack:
            kt, expanded = stack.pop()
            knode = producer(kt)
            if id(knode) in done:
                continue
            if expanded:
                done.add(id(knode))
                order.append(knode)
                continue
            stack.append((kt, True))
            for arg in reversed(knode.arguments.keras_tensors):
                if id(arg) not in mapping and id(producer(arg)) not in done:
                    stack.append((arg, False))
        return order

    def _link(self) -> None:
        for node in self.nodes.values():
            for t in node.unique_inputs:
                self.tensors[t].consumers.append(node.name)

    # -- queries ------------------------------------------------------------------------------

    @cached_property
    def order(self) -> list[str]:
        return list(self.nodes)

    @cached_property
    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.order)}

    @property
    def compute_nodes(self) -> list[str]:
        return [n for n, node in self.nodes.items() if not node.is_input]

    @property
    def input_nodes(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.is_input]

    @cached_property
    def ancestor_masks(self) -> list[int]:
        """Bit i of entry j is set when node i is node j or one of its ancestors."""
        masks: list[int] = []
        for name in self.order:
            m = 1 << self.index[name]
            for t in self.nodes[name].unique_inputs:
                m |= masks[self.index[self.tensors[t].producer]]
            masks.append(m)
        return masks

    def mask_of(self, names) -> int:
        m = 0
        for n in names:
            m |= 1 << self.index[n]
        return m

    def names_in(self, mask: int) -> list[str]:
        return [n for i, n in enumerate(self.order) if mask >> i & 1]

    def crossing(self, mask: int) -> list[str]:
        """Tensors produced inside `mask` and consumed by a node outside it, in topological order."""
        out = []
        for name in self.order:
            if not mask >> self.index[name] & 1:
                continue
            for t in self.nodes[name].outputs:
                if any(not mask >> self.index[c] & 1 for c in self.tensors[t].consumers):
                    out.append(t)
        return out

    def cut_points(self) -> list[str]:
        """Tensors that are, alone, everything live between the part before them and the part after.

        Each one's producer and ancestors form a prefix containing every model input; no other
        tensor crosses from that prefix to the rest, and the rest still has compute to do.
        """
        all_inputs = self.mask_of(self.input_nodes)
        full = (1 << len(self.order)) - 1
        points = []
        for name in self.order:
            node = self.nodes[name]
            if node.is_input:
                continue
            prefix = self.ancestor_masks[self.index[name]]
            if prefix & all_inputs != all_inputs or prefix == full:
                continue
            rest = full & ~prefix
            if not any(not self.nodes[n].is_input for n in self.names_in(rest)):
                continue
            crossing = self.crossing(prefix)
            if len(crossing) == 1 and crossing[0] in node.outputs:
                points.append(crossing[0])
        return points

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            close = [t for t in self.tensors if t.split(":")[0] == name.split(":")[0]]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SplitError(f"unknown tensor {name!r}{hint}") from None


def model_hash(model: keras.Model) -> str:
    """sha256 over the architecture and every weight, so a cached profile or a manifest names exactly one model."""
    h = hashlib.sha256()
    try:
        cfg = json.dumps(model.get_config(), sort_keys=True, default=str)
    except Exception:  # a model whose config cannot be serialised still has a structure
        cfg = json.dumps([(op.name, type(op).__name__) for op in model.operations])
    h.update(cfg.encode())
    for w in model.weights:
        h.update(w.path.encode())
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return h.hexdigest()
