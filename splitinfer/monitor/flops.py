"""FLOPs per operation of a flattened model graph, from TensorFlow's profiler on a concrete function.

Graph-op name scopes that Keras and TF make on their own carry uniquifier suffixes (`conv_1/...` for a
second trace of `conv`) that collide with real layer names, so the scope names of an ordinary trace of the
model cannot be mapped back to operations reliably. Instead the graph is replayed node by node inside a
`tf.name_scope` of our own, `n00017` for node 17 of `graph.order`: no layer can produce that top-level
scope, and each scope is opened exactly once, so the first component of every TF op's name says which
node made it. The per-node FLOPs come from the profiler's scope view of that trace; their sum is checked
against the profiler's total for the same trace (nothing may be left unattributed).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence

from splitinfer import _tf  # noqa: F401  (quiet TF before it loads)
import tensorflow as tf
from tensorflow.python.profiler import model_analyzer, option_builder

from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.graph import ModelGraph, inference_call

_SCOPE = re.compile(r"^n(\d{5,})$")


def scope_of(index: int) -> str:
    """The collision-free name scope of node `index` of `graph.order`."""
    return f"n{index:05d}"


def input_specs(graph: ModelGraph, batch: int = 1):
    """tf.TensorSpecs of the model's inputs at `batch`; every other dimension must be known."""
    if batch < 1:
        raise SplitError(f"batch must be at least 1, not {batch}")
    specs = []
    for t in graph.inputs:
        info = graph.tensors[t]
        dims = list(info.shape)
        if dims and dims[0] is None:
            dims[0] = batch
        elif dims and dims[0] != batch:
            raise SplitError(
                f"input {t} has a fixed batch size of {dims[0]}: profile it at batch {dims[0]}, not {batch}"
            )
        if any(d is None for d in dims):
            raise SplitError(
                f"input {t} has unknown dimensions {tuple(info.shape)}: FLOPs and latency need fixed input "
                "dimensions (give --input-shape, or save the model with a fixed input shape)"
            )
        specs.append(tf.TensorSpec(dims, info.dtype, name=re.sub(r"[^A-Za-z0-9_]", "_", t.split(":")[0])))
    return specs


def replay(graph: ModelGraph, nodes: Sequence[str], tensors: dict, scoped: bool = True) -> dict:
    """Run `nodes` (topological order) on the tensors in `tensors` (name -> value), adding their outputs.

    With `scoped`, each node runs inside its own `n00017` name scope so the ops it creates can be traced back.
    """
    for name in nodes:
        node = graph.nodes[name]
        values = [tensors[t] for t in node.inputs]
        if scoped:
            with tf.name_scope(scope_of(graph.index[name])):
                result = inference_call(node, values)
        else:
            result = inference_call(node, values)
        for out, value in zip(node.results, result):
            tensors[out] = value
    return tensors


def replay_function(graph: ModelGraph, batch: int = 1):
    """A concrete function of the whole graph replayed with one name scope per node."""
    compute = graph.compute_nodes

    def fn(*xs):
        tensors = replay(graph, compute, dict(zip(graph.inputs, xs)))
        return [tensors[t] for t in graph.outputs]

    return tf.function(fn, autograph=False).get_concrete_function(*input_specs(graph, batch))


def model_function(graph: ModelGraph, batch: int = 1):
    """The concrete function of the model as Keras calls it (no scopes of ours): the reference for totals."""
    model = graph.model
    specs = input_specs(graph, batch)

    def fn(*xs):
        return model(graph.model_inputs(xs), training=False)

    return tf.function(fn, autograph=False).get_concrete_function(*specs)


def _profile_graph(tf_graph):
    opts = (
        option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder.float_operation())
        .with_empty_output()
        .with_min_float_operations(0)
        .build()
    )
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # the flops registry warns about a deprecated v1 helper on every call
    try:
        return model_analyzer.profile(tf_graph, options=opts, cmd="scope")
    finally:
        logger.setLevel(level)


def profiler_total_flops(tf_graph) -> int:
    """The TF profiler's total float operations of a graph (e.g. a concrete function's `.graph`)."""
    return int(_profile_graph(tf_graph).total_float_ops)


def scoped_flops(tf_graph) -> tuple[dict[int, int], int, int]:
    """(FLOPs per node index, unattributed FLOPs, profiler total) of a graph traced with `replay`."""
    info = _profile_graph(tf_graph)
    per: dict[int, int] = {}
    other = 0
    for child in info.children:
        m = _SCOPE.match(child.name.split("/")[0])
        if m:
            per[int(m.group(1))] = per.get(int(m.group(1)), 0) + int(child.total_float_ops)
        else:
            other += int(child.total_float_ops)
    return per, other, int(info.total_float_ops)


_MEMO: "weakref.WeakKeyDictionary[ModelGraph, dict[int, dict[str, int]]]" = weakref.WeakKeyDictionary()


def node_flops(graph: ModelGraph, batch: int = 1) -> dict[str, int]:
    """FLOPs of every compute node of the flattened graph at `batch` (0 for ops the profiler counts none for).

    Counts come from TensorFlow's profiler on a concrete function with fixed input shapes; each TF op is
    attributed to the node whose private name scope created it. Raises SplitError if any FLOPs fall outside
    every node's scope (then the attribution would not add up to the profiler's total). An ONNX graph's are
    counted from its shapes (monitor.onnx_flops).
    """
    if not isinstance(graph, ModelGraph):
        from splitinfer.monitor.onnx_flops import node_flops_onnx

        return {n: f * batch for n, f in node_flops_onnx(graph).items()}
    memo = _MEMO.setdefault(graph, {})
    if batch in memo:
        return dict(memo[batch])
    cf = replay_function(graph, batch)
    per, other, total = scoped_flops(cf.graph)
    if other:
        raise SplitError(f"{other} of {total} FLOPs could not be attributed to an operation of {graph.name}")
    result = {name: per.get(graph.index[name], 0) for name in graph.compute_nodes}
    memo[batch] = result
    return dict(result)


def whole_model_profiler_flops(graph: ModelGraph, batch: int = 1) -> int:
    """The profiler's total on the model's own concrete function (as `tf.function(model)` traces it)."""
    return profiler_total_flops(model_function(graph, batch).graph)


def sum_by(flops: Mapping[str, int], names) -> int:
    return sum(int(flops.get(n, 0)) for n in names)
