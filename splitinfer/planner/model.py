"""Planner inputs: the cost graph of a model and the cluster it runs on. Plain data, no TF, no broker.

Units: times in seconds, sizes in bytes, bandwidth in bytes/s. A node's `cost` is FLOPs when the graph's
`unit` is "flops" (servers' `speed` is then GFLOP/s) or seconds on the profiling machine when the unit is
"seconds" (servers' `speed` is then a factor relative to that machine: 2.0 runs twice as fast).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from splitinfer.dag import Dag, DagQueries
from splitinfer.messages import OBJECTIVES


class PlanError(ValueError):
    """A planning request that cannot be satisfied; the message says why in one line."""


def check_objective(objective: str) -> None:
    """Raise PlanError unless `objective` is one the planner optimises (messages.OBJECTIVES)."""
    if objective not in OBJECTIVES:
        raise PlanError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")


# bytes factor of a tensor sent compressed (int8 carries one float32 scale per tensor: negligible)
CODEC_FACTOR: dict[str, float] = {"float16": 0.5, "int8": 0.25}


# --------------------------------------------------------------------------------------------- cost graph


@dataclass(frozen=True)
class CostNode:
    name: str
    cost: float  # FLOPs, or reference seconds (see CostGraph.unit)
    inputs: tuple[str, ...] = ()  # tensor names consumed
    outputs: tuple[str, ...] = ()  # tensor names produced
    param_bytes: int = 0  # weights this node needs resident on the server that runs it


@dataclass
class CostTensor:
    name: str
    nbytes: int
    producer: str | None  # None: a model input, resident on the client at time 0
    consumers: list[str] = field(default_factory=list)
    is_output: bool = False  # a final output, delivered to the client
    compressible: bool = True  # a float tensor that may be sent as float16/int8


class CostGraph(DagQueries):
    """Operations in topological order, tensors with bytes, model inputs (at the client) and outputs (to the client).

    Its DAG queries (`order`, `index`, `ancestor_masks`, ...) are those of `dag` (splitinfer.dag)."""

    def __init__(
        self,
        nodes: Sequence[CostNode],
        tensor_bytes: Mapping[str, int],
        inputs: Sequence[str],
        outputs: Sequence[str],
        unit: Literal["flops", "seconds"] = "flops",
        incompressible: Iterable[str] = (),
        name: str = "model",
        runtime_costs: Mapping[str, Mapping[str, float]] | None = None,
        device_only: Iterable[str] = (),
    ):
        """`runtime_costs`: each runtime's cost of every operation it can run (runtime -> operation -> cost), when
        they were measured; a part then runs on the runtime its operations cost least on together (`part_runtime`),
        and a node's `cost` should be its least over the runtimes (the planners' optimistic figure).
        `device_only`: operations that must run at the client's site (a privacy floor, see `privacy_floor`)."""
        if unit not in ("flops", "seconds"):
            raise PlanError(f"unit must be 'flops' or 'seconds', not {unit!r}")
        self.name = name
        self.unit = unit
        self.nodes: dict[str, CostNode] = {}
        self.tensors: dict[str, CostTensor] = {}
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        no_codec = set(incompressible)

        def tensor(t: str, producer: str | None) -> CostTensor:
            if t not in tensor_bytes:
                raise PlanError(f"tensor {t!r} has no byte size")
            if t in self.tensors:
                raise PlanError(f"tensor {t!r} is produced twice")
            info = CostTensor(t, int(tensor_bytes[t]), producer, compressible=t not in no_codec)
            self.tensors[t] = info
            return info

        for t in self.inputs:
            tensor(t, None)
        for node in nodes:
            if node.name in self.nodes:
                raise PlanError(f"operation {node.name!r} appears twice")
            if node.cost < 0 or not math.isfinite(node.cost):
                raise PlanError(f"operation {node.name!r} has cost {node.cost}")
            for t in dict.fromkeys(node.inputs):
                if t not in self.tensors:
                    raise PlanError(f"operation {node.name!r} reads {t!r} before anything produces it")
                self.tensors[t].consumers.append(node.name)
            self.nodes[node.name] = node
            for t in node.outputs:
                tensor(t, node.name)
        for t in self.outputs:
            if t not in self.tensors:
                raise PlanError(f"model output {t!r} is not a tensor of the graph")
            self.tensors[t].is_output = True
        if not self.nodes:
            raise PlanError("the cost graph has no operations")
        self.dag = Dag([(n.name, n.inputs, n.outputs) for n in self.nodes.values()], self.inputs, self.outputs)
        self.runtime_costs = {r: {n: float(c) for n, c in costs.items()} for r, costs in (runtime_costs or {}).items()}
        unknown = [n for costs in self.runtime_costs.values() for n in costs if n not in self.nodes]
        if unknown:
            raise PlanError(f"runtime costs name unknown operation {unknown[0]!r}")
        self.device_only = frozenset(device_only)
        unknown = sorted(self.device_only - set(self.nodes))
        if unknown:
            raise PlanError(f"the privacy floor names unknown operation {unknown[0]!r}")

    def with_device_only(self, nodes: Iterable[str]) -> "CostGraph":
        """The same graph with `nodes` (and the ones already so) kept at the client's site."""
        data = self.to_json()
        data["device_only"] = sorted(self.device_only | set(nodes))
        return CostGraph.from_json(data)

    def keep_on_device(self, floor: str | int | None) -> "CostGraph":
        """The graph with a privacy floor (`--keep-on-device`): an integer K keeps the first K operations at the
        client's site, a tensor name every operation up to it; None or "" the graph as it is."""
        if floor is None or floor == "":
            return self
        text = str(floor).strip()
        nodes = self.privacy_floor(first_ops=int(text)) if text.isdigit() else self.privacy_floor(up_to=text)
        return self.with_device_only(nodes)

    def privacy_floor(self, first_ops: int | None = None, up_to: str | None = None) -> list[str]:
        """The operations a privacy floor keeps on the device: the first `first_ops` of the topological order, or
        every operation `up_to` (a tensor) depends on, its producer included."""
        if (first_ops is None) == (up_to is None):
            raise PlanError("a privacy floor is the first K operations or the operations up to a tensor, not both")
        if first_ops is not None:
            if not 0 <= first_ops <= len(self.order):
                raise PlanError(f"the privacy floor keeps {first_ops} operations; the model has {len(self.order)}")
            return list(self.order[:first_ops])
        if up_to not in self.tensors:
            raise PlanError(f"the privacy floor names unknown tensor {up_to!r}")
        if self.tensors[up_to].producer is None:
            return []
        return self.names_in(self.upstream(up_to))

    def part_runtime(self, nodes: Iterable[str], runtimes: Iterable[str] | None = None) -> tuple[str | None, float]:
        """(the runtime the operations cost least on together, that cost); (None, the nodes' costs) without
        measured runtimes. `runtimes`: those the server has (default all)."""
        nodes = list(nodes)
        best: tuple[str | None, float] = (None, sum(self.nodes[n].cost for n in nodes))
        allowed = None if runtimes is None else set(runtimes)
        choices = [(sum(costs[n] for n in nodes), r) for r, costs in self.runtime_costs.items()
                   if (allowed is None or r in allowed) and all(n in costs for n in nodes)]
        if choices:
            cost, runtime = min(choices)
            best = (runtime, cost)
        return best

    # -- structure ------------------------------------------------------------------------------------

    @cached_property
    def cut_points(self) -> list[str]:
        """Tensors that are, alone, all that passes from the part before them to the part after (Dag.cut_points),
        with every model output leaving from the last part: the chain planner prices the hop back to the client
        from the last segment only."""
        return self.dag.cut_points(outputs_from_last_part=True)

    def segments(self) -> list[tuple[list[str], str | None]]:
        """The graph cut at every cut point: (operations, the tensor leaving them or None for the last)."""
        return self.dag.segments(self.cut_points)

    @property
    def total_cost(self) -> float:
        return sum(n.cost for n in self.nodes.values())

    @property
    def total_params(self) -> int:
        """Bytes of weights of every operation."""
        return sum(n.param_bytes for n in self.nodes.values())

    def to_json(self) -> dict:
        """Everything the planner needs, as plain JSON: a deployed plan table carries it so that the optimizer can
        re-predict its plans from live state without the model (or TensorFlow)."""
        return {
            "name": self.name, "unit": self.unit, "inputs": self.inputs, "outputs": self.outputs,
            "nodes": [[n.name, n.cost, list(n.inputs), list(n.outputs), n.param_bytes] for n in self.nodes.values()],
            "tensor_bytes": {t: info.nbytes for t, info in self.tensors.items()},
            "incompressible": [t for t, info in self.tensors.items() if not info.compressible],
            "runtime_costs": self.runtime_costs,
            "device_only": sorted(self.device_only),
        }

    @classmethod
    def from_json(cls, data: Mapping) -> CostGraph:
        nodes = [CostNode(n, float(c), tuple(i), tuple(o), int(p)) for n, c, i, o, p in data["nodes"]]
        return cls(nodes, data["tensor_bytes"], data["inputs"], data["outputs"], unit=data["unit"],
                   incompressible=data.get("incompressible", ()), name=data.get("name", "model"),
                   runtime_costs=data.get("runtime_costs"), device_only=data.get("device_only", ()))

    def __repr__(self) -> str:
        return f"CostGraph({self.name!r}, {len(self.nodes)} operations, {len(self.tensors)} tensors, unit={self.unit})"


# --------------------------------------------------------------------------------------------- cluster


class PowerProfile(BaseModel):
    """Power draw of a battery device, watts."""

    model_config = ConfigDict(frozen=True)
    compute_w: float = Field(ge=0)
    radio_w: float = Field(ge=0)
    idle_w: float = Field(ge=0)


class Server(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    site: str
    # GFLOP/s for a graph in FLOPs; a factor relative to the profiling machine for a graph in reference seconds
    speed: float = Field(gt=0)
    # fraction of the server's compute already taken by other work, 0 <= load < 1: effective speed x (1 - load)
    load: float = Field(default=0.0, ge=0, lt=1)
    memory: int | None = Field(default=None, ge=0)  # bytes available for weights; None: unlimited
    power: PowerProfile | None = None  # set on a battery device
    runtimes: tuple[str, ...] | None = None  # the part runtimes it has (None: every runtime the graph measured)

    @property
    def effective_speed(self) -> float:
        """Its speed less the share other work takes."""
        return self.speed * (1.0 - self.load)


class Link(BaseModel):
    """A symmetric link between two sites. A link from a site to itself overrides the default (0 s, unlimited)."""

    model_config = ConfigDict(frozen=True)
    a: str
    b: str
    rtt: float = Field(ge=0)  # seconds
    bandwidth: float = Field(gt=0)  # bytes/s


class BrokerOverhead(BaseModel):
    """Cost of one RabbitMQ hop of one tensor message (publish with confirm, consume, decode), measured here."""

    model_config = ConfigDict(frozen=True)
    per_message: float = Field(default=0.7e-3, ge=0)  # seconds
    per_byte: float = Field(default=2.5e-3 / 1e6, ge=0)  # seconds per byte (2.5 ms per MB)

    @classmethod
    def from_ms(cls, per_message_ms: float, per_mb_ms: float) -> BrokerOverhead:
        """From the settings' units: milliseconds per message and per MB."""
        return cls(per_message=per_message_ms / 1e3, per_byte=per_mb_ms / 1e3 / 1e6)


class Cluster(BaseModel):
    servers: list[Server]
    links: list[Link] = []
    client: str  # the device that holds the inputs and receives the outputs; it may run parts too
    broker: BrokerOverhead = BrokerOverhead()

    def server(self, name: str) -> Server:
        for s in self.servers:
            if s.name == name:
                return s
        raise PlanError(f"unknown server {name!r} (known: {', '.join(s.name for s in self.servers)})")

    def link(self, site_a: str, site_b: str) -> tuple[float, float] | None:
        """(rtt, bandwidth) between two sites; (0, inf) within a site unless configured; None when unconnected."""
        for link in self.links:
            if {link.a, link.b} == {site_a, site_b}:
                return link.rtt, link.bandwidth
        if site_a == site_b:
            return 0.0, math.inf
        return None

    def check(self) -> None:
        """Raise PlanError for an inconsistent cluster."""
        names = [s.name for s in self.servers]
        if not names:
            raise PlanError("the cluster has no servers")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise PlanError(f"server name {sorted(dup)[0]!r} is used twice")
        self.server(self.client)
        # a link to a site without servers is harmless (a site empties when its servers are excluded)

    def without(self, names: Iterable[str]) -> Cluster:
        """The cluster with some servers removed (the client cannot be removed)."""
        gone = set(names)
        for n in gone:
            self.server(n)
        if self.client in gone:
            raise PlanError(f"the client {self.client!r} cannot be removed")
        return self.model_copy(update={"servers": [s for s in self.servers if s.name not in gone]})
