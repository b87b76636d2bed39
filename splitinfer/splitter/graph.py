"""The tensor graph of a Keras model, built from its nodes (not get_config), with nested models flattened.

Every call of an operation is one graph node, the non-layer ops Keras records for `x + 3.0` included.
A node is named after its operation (`conv`), a second call of the same operation in one model gets
`conv@1`, and a node inside a nested model is prefixed with the nested model's node name (`backbone/conv`).
Every tensor is named `<node>:<output index>`; the names depend only on the model's structure, so they are
the same in every process that builds or loads the same model.

Keras masks (`Embedding(mask_zero=True)`, `Masking`) ride on tensors as attributes, and layers read them
without taking them as arguments (MultiHeadAttention, Add/Maximum/Multiply, every layer passing a mask on).
A part input is a fresh `keras.Input` without a mask, so the mask of output i of node `emb` is a tensor of
its own, `emb:mask<i>`: produced with the tensor it masks, and an input of every layer consuming that tensor.
A part taking the tensor takes the mask too and puts it back on (`build.RestoreMask`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from splitinfer import _tf  # noqa: F401  (quiet TF before keras imports it)
import keras
import tensorflow as tf
from keras import tree
from keras.src.models.functional import Functional
from keras.src.models.sequential import Sequential

from splitinfer.dag import Dag, DagQueries
from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.tensors import TensorInfo


@dataclass
class GraphNode:
    name: str
    op_type: str
    inputs: list[str]  # tensor names, in the order of the call's flattened tensor arguments
    outputs: list[str]  # the call's flattened results `name:<i>`, then the Keras masks on them (`mask_outputs`)
    is_input: bool = False
    keras_node: object = field(default=None, repr=False, compare=False)
    operation: object = field(default=None, repr=False, compare=False)
    masks: list[str] = field(default_factory=list)  # masks its (layer) call reads off its argument tensors
    mask_outputs: list[str] = field(default_factory=list)  # masks Keras puts on its results: `name:mask<i>`

    @property
    def unique_inputs(self) -> list[str]:
        """Every tensor the node depends on: its arguments, then the masks they carry."""
        return list(dict.fromkeys(self.inputs + self.masks))

    @property
    def results(self) -> list[str]:
        """The tensors its call returns, in order (its outputs without the masks)."""
        return [t for t in self.outputs if t not in self.mask_outputs]

    def weight_size(self) -> tuple[int, int]:
        """(values, bytes) of its operation's weights; every call of a shared layer reports all of them."""
        count = nbytes = 0
        for w in getattr(self.operation, "weights", None) or []:
            n = int(np.prod(w.shape, dtype=np.int64))
            count += n
            nbytes += n * np.dtype(str(getattr(w, "dtype", "float32"))).itemsize
        return count, nbytes


def _tensor_dtype(kt) -> str:
    name = keras.backend.standardize_dtype(kt.dtype)
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biuf":
        raise SplitError(
            f"tensor {getattr(kt, 'name', kt)!r} has dtype {name}: only numeric and bool tensors can be handed "
            "between parts (do string preprocessing outside the model)"
        )
    return str(dtype)


@keras.saving.register_keras_serializable(package="splitinfer")
class RestoreMask(keras.layers.Layer):
    """Puts a Keras mask, held by a tensor of its own, back on the tensor it belongs to (an identity otherwise).

    A part input is a fresh `keras.Input`, which carries no mask, and a nested model puts the mask it is called
    with on its inputs; layers that read their input's mask (MultiHeadAttention, Add/Maximum/Multiply, every
    layer passing a mask on) would otherwise run unmasked once the model is cut or flattened.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        return keras.ops.copy(inputs)

    def compute_mask(self, inputs, mask=None):
        return mask


def inference_call(node: "GraphNode", values) -> list:
    """Call a node's operation on `values` (its argument tensors, in `node.inputs` order) as a Keras Functional
    model called with training=False does: that overrides a `training=True` the call was recorded with
    (e.g. Monte-Carlo dropout), since `model(x, training=False)` is what the parts and the source run."""
    knode = node.keras_node
    bound = {id(kt): v for kt, v in zip(knode.arguments.keras_tensors, values)}
    args, kwargs = knode.arguments.fill_in(bound)
    if "training" in getattr(node.operation, "_call_context_args", ()):
        kwargs["training"] = False
    return tree.flatten(node.operation(*args, **kwargs))


def error_line(exc: BaseException) -> str:
    """The line of an exception's message that says what went wrong. Keras marks it in bold inside its report
    ("Exception encountered when calling ..."), TF puts it after the user-code stack of a traced function."""
    text = str(exc)
    bold = re.search(r"\x1b\[1m(.*?)\x1b\[0m", text, re.S)
    if bold and bold.group(1).strip():
        return bold.group(1).strip().splitlines()[0][:300]
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]
    if lines and lines[0].startswith("in user code:"):
        errors = [m.group(2) for m in map(_ERROR_LINE.match, lines) if m and "Exception encountered" not in m.group(2)]
        if errors:
            return errors[-1][:300]
    return (lines or [type(exc).__name__])[0][:300]


_ERROR_LINE = re.compile(r"^(\w+(?:Error|Exception|Exit|Interrupt)): (.+)$")


def _functional_of(op):
    """The Functional graph behind a nested model, or None for an opaque operation."""
    if isinstance(op, Sequential):
        inner = getattr(op, "_functional", None)
        return inner if isinstance(inner, Functional) else None
    if isinstance(op, Functional):
        return op
    return None


class ModelGraph(DagQueries):
    """Nodes in topological order, tensors with producer and consumers, the model's inputs and outputs.

    Its DAG queries (`order`, `index`, `ancestor_masks`, `crossing`, ...) are those of `dag` (splitinfer.dag), whose
    sources are the input nodes."""

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
        self._masked = False
        self.outputs: list[str] = self._expand(functional, "", mapping)
        if self._masked:
            self._add_masks()
        self._link()
        self.dag = Dag([(n, node.unique_inputs, node.outputs) for n, node in self.nodes.items()],
                       self.inputs, self.outputs)

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
            if not self._masked and any(
                getattr(kt, "_keras_mask", None) is not None for kt in [*knode.arguments.keras_tensors, *knode.outputs]
            ):
                self._masked = True
            inner = _functional_of(op)
            if inner is not None:
                sub_prefix = self._unique(prefix + op.name) + "/"
                inner_inputs = tree.flatten(inner._inputs_struct)
                call_inputs, call_masks = self._nested_call_tensors(knode, op, mapping)
                if len(inner_inputs) != len(call_inputs):
                    raise SplitError(
                        f"nested model {op.name!r} called with {len(call_inputs)} tensors "
                        f"but has {len(inner_inputs)} inputs"
                    )
                inner_names = []
                for inner_kt, kt, mask in zip(inner_inputs, call_inputs, call_masks):
                    if mask is None:
                        inner_names.append(mapping[id(kt)])
                        continue
                    # The nested model puts the mask it is called with on its input (Functional.call); replay
                    # that as a node of its own, so the layers inside see it wherever the model is cut.
                    node_name = self._unique(sub_prefix + inner_kt._keras_history.operation.name)
                    holder = RestoreMask(name=re.sub(r"\W", "_", node_name) + "_mask")
                    masked = holder(kt, mask=mask)
                    self._add_node(
                        GraphNode(node_name, "RestoreMask", [mapping[id(kt)], mapping[id(mask)]], [f"{node_name}:0"],
                                  keras_node=holder._inbound_nodes[-1], operation=holder),
                        [masked],
                    )
                    inner_names.append(f"{node_name}:0")
                    self._masked = True
                inner_map = {id(kt): n for kt, n in zip(inner_inputs, inner_names)}
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
    def _nested_call_tensors(knode, op, mapping) -> tuple[list, list]:
        """The tensors a nested model was called on, and the mask given for each (None where there is none)."""
        args, kwargs = knode.arguments.args, knode.arguments.kwargs
        inputs = args[0] if args else kwargs.get("inputs")
        flat = [kt for kt in tree.flatten(inputs) if isinstance(kt, keras.KerasTensor)]
        masks: list = [None] * len(flat)
        given = kwargs.get("mask")
        if given is not None:
            flat_masks = tree.flatten(given)
            if len(flat_masks) == len(flat):
                masks = [m if isinstance(m, keras.KerasTensor) else None for m in flat_masks]
        used = {id(kt) for kt in flat} | {id(m) for m in masks if m is not None}
        other = [kt for kt in knode.arguments.keras_tensors if id(kt) not in used]
        if other:
            raise SplitError(
                f"nested model {op.name!r} is called with tensor {mapping.get(id(other[0]), other[0].name)!r} besides "
                "its inputs and their masks; such a call cannot be flattened"
            )
        return flat, masks

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

    def _add_masks(self) -> None:
        """Find which layer reads which Keras mask, and add each mask read as a tensor `node:mask<i>`.

        Masks are runtime attributes of tensors with runtime semantics (MultiHeadAttention clears the masks of
        its inputs, so an Add after it sees none), which a symbolic build does not show. So the flattened graph
        is traced once in a tf.function, as it runs, and a layer depends on the mask of an argument exactly when
        that argument carries one as the layer is called.
        """
        reads: dict[str, list[str]] = {}
        produced: dict[str, tuple[int, object]] = {}

        def trace(*xs):
            values = dict(zip(self.inputs, xs))
            for node in self.nodes.values():
                if node.is_input:
                    continue
                if isinstance(node.operation, keras.layers.Layer) and not isinstance(node.operation, RestoreMask):
                    seen = [t for t in dict.fromkeys(node.inputs)
                            if getattr(values[t], "_keras_mask", None) is not None]
                    if seen:
                        reads[node.name] = seen
                result = inference_call(node, [values[t] for t in node.inputs])
                for i, (t, value) in enumerate(zip(node.results, result)):
                    values[t] = value
                    mask = getattr(value, "_keras_mask", None)
                    if mask is not None:
                        produced[t] = (i, mask)
            return []

        specs = [tf.TensorSpec(self.tensors[t].shape, self.tensors[t].dtype) for t in self.inputs]
        try:
            tf.function(trace, autograph=False).get_concrete_function(*specs)
        except Exception as exc:  # noqa: BLE001 - a model Keras can build but not trace; name it in one line
            raise SplitError(f"cannot trace {self.model.name} to find its Keras masks: {error_line(exc)}") from None
        for name, tensors in reads.items():
            node = self.nodes[name]
            for t in tensors:
                if t not in produced:
                    continue
                info = self.tensors[t]
                if info.mask is None:
                    i, mask = produced[t]
                    info.mask = f"{info.producer}:mask{i}"
                    self.nodes[info.producer].mask_outputs.append(info.mask)
                    self.nodes[info.producer].outputs.append(info.mask)
                    self.tensors[info.mask] = TensorInfo(
                        info.mask, tuple(mask.shape.as_list()), _tensor_dtype(mask), info.producer
                    )
                node.masks.append(info.mask)

    def _link(self) -> None:
        for node in self.nodes.values():
            for t in node.unique_inputs:
                self.tensors[t].consumers.append(node.name)

    # -- queries ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def compute_nodes(self) -> list[str]:
        return [n for n, node in self.nodes.items() if not node.is_input]

    @cached_property
    def operation_names(self) -> frozenset[str]:
        """The Keras names of every operation in the graph (nested models' own included)."""
        return frozenset(str(node.operation.name) for node in self.nodes.values() if node.operation is not None)

    @property
    def input_nodes(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.is_input]

    def cut_points(self) -> list[str]:
        """Tensors that are, alone, everything live between the part before them and the part after
        (Dag.cut_points); a model output may come out of a part before the last."""
        return self.dag.cut_points(outputs_from_last_part=False)

    def model_inputs(self, values):
        """`values` (one per `self.inputs`, in order) in the structure the model is called with: a single tensor,
        a list, or a dict keyed as the model's inputs."""
        return tree.pack_sequence_as(_functional_of(self.model)._inputs_struct, list(values))

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
