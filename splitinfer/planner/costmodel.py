"""The cost model every planner and every plan prediction uses.

- Compute: a part's time on server s is its cost / effective speed, effective speed = speed x (1 - load)
  (speed in GFLOP/s for costs in FLOPs, a factor for costs in reference seconds); with runtimes measured, its
  cost on the server's runtime its operations cost least on together (CostGraph.part_runtime).
- Transfer: tensors sent from server a to server b (a != b) as one hop cost
  rtt(site a, site b) + sum over the tensors of (bytes / bandwidth + broker per-message + broker per-byte x bytes):
  they share the link, each is its own RabbitMQ message, the receiver waits for all of them. Nothing is paid when
  a == b; two servers at one site still pay the broker (the site's own link is 0 s and unlimited unless configured).
- Latency of a plan (a list of parts, each on a server, in dependency order): a part starts when all its inputs
  have arrived (the runtime's join), runs its compute, then sends its outputs; model inputs leave the client at
  time 0 and final outputs must reach the client. Latency = the latest arrival at the client (the critical path
  over parts, one request alone in the system: no queueing behind other requests).
- Device energy (the client, when it has a power profile): compute_w x client compute time + radio_w x radio time
  + idle_w x max(0, latency - compute time - radio time), where radio time is bytes / bandwidth of every hop the
  client sends or receives (the RTT and the broker time count as waiting).
- Fidelity: the product of the given fidelity (e.g. top-1 agreement with float32) of every tensor sent compressed.
- Bottleneck (pipelined throughput = 1 / bottleneck): the busiest stage per request, over each server's total
  compute and each directed site-to-site link's bytes / bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from splitinfer.planner.model import CODEC_FACTOR, Cluster, CostGraph, PlanError

STAND_IN_FLOOR = 1e-6  # a server slower than this is the planner's stand-in for a client with no server


class CostModel:
    """Per-server compute rates and per-server-pair link figures for one graph on one cluster."""

    def __init__(self, graph: CostGraph, cluster: Cluster, exclude: Sequence[str] = ()):
        cluster.check()
        for n in exclude:
            cluster.server(n)
        if cluster.client in set(exclude):
            raise PlanError(f"the client {cluster.client!r} cannot be excluded")
        self.graph = graph
        self.cluster = cluster
        self.servers = [s for s in cluster.servers if s.name not in set(exclude)]
        self.names = [s.name for s in self.servers]
        self.idx = {n: i for i, n in enumerate(self.names)}
        self.client = self.idx[cluster.client]
        scale = 1e9 if graph.unit == "flops" else 1.0
        self.rate = [s.effective_speed * scale for s in self.servers]  # cost units per second
        self.broker = cluster.broker
        n = len(self.servers)
        links = {frozenset((x.a, x.b)): (x.rtt, x.bandwidth) for x in reversed(cluster.links)}  # first one wins
        self.rtt = [[0.0] * n for _ in range(n)]
        self.bw = [[math.inf] * n for _ in range(n)]
        self.reach = [[True] * n for _ in range(n)]
        self.site_pair = [[("", "")] * n for _ in range(n)]
        for i, a in enumerate(self.servers):
            for j, b in enumerate(self.servers):
                self.site_pair[i][j] = (a.site, b.site)
                if i == j:
                    continue
                link = links.get(frozenset((a.site, b.site)), (0.0, math.inf) if a.site == b.site else None)
                if link is None:
                    self.reach[i][j] = False
                    self.rtt[i][j], self.bw[i][j] = math.inf, 0.0
                else:
                    self.rtt[i][j], self.bw[i][j] = link
        power = self.servers[self.client].power
        self.power = power
        # the servers a device-only operation may run on: those at the client's site (a stand-in client, with no
        # real server there, runs nothing)
        site = self.servers[self.client].site
        self.device_site = [s.site == site and s.speed > STAND_IN_FLOOR for s in self.servers]

    def may_run(self, nodes, s: int) -> bool:
        """Whether server s may run all of `nodes` (the privacy floor keeps device-only operations at the client's
        site)."""
        return self.device_site[s] or not self.graph.device_only.intersection(nodes)

    def compute(self, cost: float, s: int) -> float:
        return cost / self.rate[s]

    def per_tensor(self, nbytes: float, a: int, b: int) -> float:
        """The share of one tensor in a hop a -> b, without the RTT."""
        return nbytes / self.bw[a][b] + self.broker.per_message + self.broker.per_byte * nbytes

    def hop(self, a: int, b: int, sizes: Sequence[float]) -> float:
        if a == b or not sizes:
            return 0.0
        if not self.reach[a][b]:
            return math.inf
        return self.rtt[a][b] + sum(self.per_tensor(x, a, b) for x in sizes)

    def hop_matrix(self, nbytes: float) -> np.ndarray:
        """`hop` of one tensor of `nbytes` for every pair of servers at once (S x S; inf where unreachable)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.array(self.rtt) + nbytes / np.array(self.bw) + self.broker.per_message \
                + self.broker.per_byte * nbytes
        out[~np.array(self.reach, dtype=bool)] = np.inf
        np.fill_diagonal(out, 0.0)
        return out

    def wire(self, a: int, b: int, nbytes: float) -> float:
        """bytes / bandwidth: the time the bytes occupy the link (radio-on time when the client is an end)."""
        if a == b:
            return 0.0
        return nbytes / self.bw[a][b] if self.reach[a][b] else math.inf

    def radio(self, a: int, b: int, nbytes: float) -> float:
        return self.wire(a, b, nbytes) if self.client in (a, b) and a != b else 0.0

    def energy(self, latency: float, device_compute: float, device_radio: float) -> float:
        p = self.power
        if p is None:
            return 0.0
        idle = max(0.0, latency - device_compute - device_radio)
        return p.compute_w * device_compute + p.radio_w * device_radio + p.idle_w * idle


def dominated_servers(graph: CostGraph, cluster: Cluster, exclude: Sequence[str] = ()) -> list[str]:
    """Servers no best chain plan needs, because another server at the same site is at least as good for any part:
    it is not the client, its memory holds every weight of the model, it has every runtime the other has, and its
    effective speed is no lower (on a tie, the one listed first stays). Putting that server in the place of a
    dominated one keeps every hop's cost (same site, same links) or removes the hop (it was its neighbour), runs
    each part no slower and holds whatever the other held, so the chain DP stays exact on the servers left: a
    cluster of many servers at few sites plans as fast as one server per site. Not for the DAG program, whose
    plans may run parallel branches on two servers of one site at once."""
    out = set(exclude)
    total = graph.total_params
    live = [(i, s) for i, s in enumerate(cluster.servers) if s.name not in out]

    def has_runtimes(a, b) -> bool:
        return a.runtimes is None or (b.runtimes is not None and set(b.runtimes) <= set(a.runtimes))

    holders = [(i, s) for i, s in live if s.name != cluster.client and (s.memory is None or s.memory >= total)]
    dominated = []
    for j, b in live:
        if b.name == cluster.client:
            continue
        b_holds = b.memory is None or b.memory >= total
        for i, a in holders:
            if i == j or a.site != b.site or not has_runtimes(a, b):
                continue
            ra, rb = a.effective_speed, b.effective_speed
            if ra > rb or (ra == rb and (not b_holds or (i < j and has_runtimes(b, a)))):
                dominated.append(b.name)
                break
    return dominated


@dataclass
class Prediction:
    latency: float
    energy: float
    fidelity: float
    bottleneck: float  # seconds per request of the busiest stage when pipelined
    device_compute: float
    device_radio: float
    memory: dict[str, int]  # weights bytes per server
    fits_memory: bool
    runtimes: list[str | None] | None = None  # per part: the runtime it runs on (None: the graph measured none)


def _bytes(cm: CostModel, t: str, compression: Mapping[str, str]) -> float:
    info = cm.graph.tensors[t]
    codec = compression.get(t)
    return info.nbytes * CODEC_FACTOR[codec] if codec else float(info.nbytes)


def evaluate(
    graph: CostGraph,
    cluster: Cluster,
    parts: Sequence[tuple[str, Sequence[str]]],
    compression: Mapping[str, str] | None = None,
    fidelity: Mapping[str, Mapping[str, float]] | None = None,
    cm: CostModel | None = None,
) -> Prediction:
    """Predict a plan given as [(server, [operations...]), ...] in dependency order (see module docstring)."""
    cm = cm or CostModel(graph, cluster)
    compression = dict(compression or {})
    for t, codec in compression.items():
        if codec not in CODEC_FACTOR:
            raise PlanError(f"unknown codec {codec!r} for tensor {t!r} (known: {', '.join(CODEC_FACTOR)})")
        if t not in graph.tensors:
            raise PlanError(f"compression names unknown tensor {t!r}")
    owner: dict[str, int] = {}
    servers: list[int] = []
    for i, (server, nodes) in enumerate(parts):
        if server not in cm.idx:
            cluster.server(server)  # unknown -> PlanError
            raise PlanError(f"server {server!r} is excluded from this plan's cluster")
        servers.append(cm.idx[server])
        for n in nodes:
            if n not in graph.nodes:
                raise PlanError(f"plan names unknown operation {n!r}")
            if n in owner:
                raise PlanError(f"operation {n!r} is in two parts")
            owner[n] = i
    missing = [n for n in graph.order if n not in owner]
    if missing:
        raise PlanError(f"plan leaves {len(missing)} operation(s) unplaced, first {missing[0]!r}")

    k = len(parts)
    params = [0] * k
    for n, i in owner.items():
        params[i] += graph.nodes[n].param_bytes
    runtimes: list[str | None] = []
    cost = []
    for server, nodes in parts:
        if not cm.may_run(nodes, cm.idx[server]):
            raise PlanError(f"the privacy floor keeps {sorted(graph.device_only.intersection(nodes))[0]!r} at the "
                            f"client's site, not on {server}")
        runtime, c = graph.part_runtime(nodes, cm.servers[cm.idx[server]].runtimes)
        runtimes.append(runtime)
        cost.append(c)
    # incoming tensors per part, grouped by source part (-1: the client's model inputs); each tensor once per part
    incoming: list[dict[int, list[str]]] = [{} for _ in range(k)]
    outgoing_final: list[list[str]] = [[] for _ in range(k)]
    sent: set[str] = set()  # tensors that cross servers at least once
    for t, info in graph.tensors.items():
        src = -1 if info.producer is None else owner[info.producer]
        dests = dict.fromkeys(owner[c] for c in info.consumers)
        for d in dests:
            if d == src:
                continue
            if src >= 0 and d < src:
                raise PlanError(f"parts are not in dependency order: tensor {t!r} goes from part {src} back to {d}")
            incoming[d].setdefault(src, []).append(t)
            if (servers[src] if src >= 0 else cm.client) != servers[d]:
                sent.add(t)
        if info.is_output:
            if src < 0:
                continue  # an input that is also an output never leaves the client
            outgoing_final[src].append(t)
            if servers[src] != cm.client:
                sent.add(t)

    start = [0.0] * k
    finish = [0.0] * k
    device_compute = device_radio = 0.0
    link_load: dict[tuple[str, str], float] = {}
    server_load = [0.0] * len(cm.servers)

    carried: set[tuple[str, int, int]] = set()

    def account(a: int, b: int, tensors: list[str]) -> float:
        """The hop's time; radio and link occupancy are counted once per (tensor, sending, receiving server)."""
        nonlocal device_radio
        sizes = [_bytes(cm, t, compression) for t in tensors]
        if a != b:
            for t, x in zip(tensors, sizes):
                if (t, a, b) in carried:
                    continue
                carried.add((t, a, b))
                device_radio += cm.radio(a, b, x)
                pair = cm.site_pair[a][b]
                link_load[pair] = link_load.get(pair, 0.0) + cm.wire(a, b, x)
        return cm.hop(a, b, sizes)

    for i in range(k):
        ready = 0.0
        for src, tensors in incoming[i].items():
            a = cm.client if src < 0 else servers[src]
            ready = max(ready, (0.0 if src < 0 else finish[src]) + account(a, servers[i], tensors))
        start[i] = ready
        dt = cm.compute(cost[i], servers[i])
        finish[i] = ready + dt
        server_load[servers[i]] += dt
        if servers[i] == cm.client:
            device_compute += dt
    latency = max(finish) if k else 0.0
    for i in range(k):
        if outgoing_final[i]:
            latency = max(latency, finish[i] + account(servers[i], cm.client, outgoing_final[i]))

    fid = 1.0
    for t, codec in compression.items():
        if t in sent:
            table = (fidelity or {}).get(t, {})
            if codec not in table:
                raise PlanError(f"no fidelity figure for tensor {t!r} sent as {codec}")
            fid *= table[codec]
    memory: dict[str, int] = {}
    for i in range(k):
        memory[cm.names[servers[i]]] = memory.get(cm.names[servers[i]], 0) + params[i]
    fits = all(cm.servers[cm.idx[s]].memory is None or m <= cm.servers[cm.idx[s]].memory for s, m in memory.items())
    bottleneck = max([*server_load, *link_load.values(), 0.0])
    return Prediction(
        latency=latency,
        energy=cm.energy(latency, device_compute, device_radio),
        fidelity=fid,
        bottleneck=bottleneck,
        device_compute=device_compute,
        device_radio=device_radio,
        memory=memory,
        fits_memory=fits,
        runtimes=runtimes,
    )
