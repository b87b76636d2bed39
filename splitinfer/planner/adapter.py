"""Build a CostGraph from the splitter's ModelGraph plus per-operation costs (FLOPs from the profiler, or seconds).

Importing this module does not import TensorFlow; the ModelGraph you pass in already did.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np

from splitinfer.planner.model import CostGraph, CostNode, PlanError

if TYPE_CHECKING:
    from splitinfer.splitter.graph import ModelGraph


def param_bytes_of(graph: ModelGraph) -> dict[str, int]:
    """Bytes of the weights each compute node needs; an operation called several times (a shared layer) is
    charged to its first call only."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for name in graph.compute_nodes:
        node = graph.nodes[name]
        total = 0
        if node.operation is not None and id(node.operation) not in seen:
            seen.add(id(node.operation))
            total = node.weight_size()[1]
        out[name] = total
    return out


def cost_graph_from(
    graph: ModelGraph,
    node_costs: Mapping[str, float],
    batch: int = 1,
    *,
    unit: Literal["flops", "seconds"] = "flops",
    param_bytes: Mapping[str, int] | None = None,
    runtime_costs: Mapping[str, Mapping[str, float]] | None = None,
) -> CostGraph:
    """The planner's view of a ModelGraph: every compute node with its cost (node_costs[name], FLOPs by default,
    e.g. splitinfer.monitor.node_flops(graph, batch)), the bytes of every tensor at `batch`, the weights each node
    needs (from the model unless given), model inputs and outputs. Non-float tensors are marked incompressible."""
    missing = [n for n in graph.compute_nodes if n not in node_costs]
    if missing:
        raise PlanError(f"no cost for {len(missing)} operation(s) of {graph.name}, first {missing[0]!r}")
    params = dict(param_bytes) if param_bytes is not None else param_bytes_of(graph)
    nodes = [
        CostNode(
            name,
            float(node_costs[name]),
            tuple(graph.nodes[name].unique_inputs),
            tuple(graph.nodes[name].outputs),
            int(params.get(name, 0)),
        )
        for name in graph.compute_nodes
    ]
    tensor_bytes = {t: info.nbytes(batch) for t, info in graph.tensors.items()}
    incompressible = [t for t, info in graph.tensors.items() if np.dtype(info.dtype).kind != "f"]
    return CostGraph(
        nodes,
        tensor_bytes,
        graph.inputs,
        graph.outputs,
        unit=unit,
        incompressible=incompressible,
        name=graph.name,
        runtime_costs=runtime_costs,
    )


MIN_OP_SECONDS = 1e-6  # an operation measured at 0 still costs something, so a stand-in client never runs it


def cost_graph_from_profile(graph: ModelGraph, profile) -> CostGraph:
    """The planner's view with each operation's measured seconds on the profiling machine (a monitor.ModelProfile
    of this graph): the unit the optimizer plans in, so a server's speed is a factor over that machine."""
    per_runtime = {r: {n: max(s, MIN_OP_SECONDS) for n, s in costs.items()}
                   for r, costs in profile.runtime_op_seconds().items()}
    # a node's own cost: its least over the runtimes (what the planners optimise); each part then runs on the
    # runtime its nodes cost least on together (CostGraph.part_runtime)
    best = {n: min(costs[n] for costs in per_runtime.values() if n in costs) for n in per_runtime["tf"]}
    return cost_graph_from(graph, best, profile.batch, unit="seconds",
                           runtime_costs=per_runtime if len(per_runtime) > 1 else None)
