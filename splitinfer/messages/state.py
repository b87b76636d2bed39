"""What the cluster knows about itself: who is alive and hosts what, each server's monitored state, the links
between sites (measured, and emulated on request), and the questions that read them."""

from __future__ import annotations

import time
from typing import ClassVar

from pydantic import Field

from splitinfer.messages.wire import Frozen, Id, Message


class LinkSpec(Frozen):
    """An emulated link between two sites (symmetric): round-trip time and bandwidth (None: unlimited)."""

    rtt_ms: float = Field(0.0, ge=0)
    bandwidth_mbps: float | None = Field(None, gt=0)  # megabits per second


def split_pair(key: str) -> tuple[str, str]:
    """A link's key 'device-edge' -> ('device', 'edge'). Site names must not contain '-'."""
    parts = key.split("-")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"link {key!r}: use 'siteA-siteB' (site names without '-')")
    return parts[0], parts[1]


class PowerSpec(Frozen):
    """Power draw of a battery device, watts (same figures as planner.model.PowerProfile)."""

    compute_w: float = Field(2.5, ge=0)
    radio_w: float = Field(1.2, ge=0)
    idle_w: float = Field(0.3, ge=0)


class PartRef(Frozen):
    """One replica of one part of a deployment, as a server hosts it."""

    deployment: Id
    part: Id
    replica: int = Field(0, ge=0)
    replicas: int = Field(1, ge=1)


class ServerState(Frozen):
    cpu_percent: float | None = None
    memory_mb: float | None = None
    load: float | None = None            # work items queued or running
    queue_depths: dict[str, int] = Field(default_factory=dict)
    processed: int = 0
    errors: int = 0
    # server / device monitor (splitinfer.monitor.runtime): what the optimizer and the front end plan with
    site: str = ""
    load_avg: float | None = None        # 1-minute system load average
    speed_gflops: float | None = None    # calibrated (cached calibration) or configured speed, before slowdown
    slowdown: float = 1.0                # emulated slower device: compute takes this many times longer
    battery: float | None = None         # 0..1; None: not a battery device
    battery_source: str | None = None    # "sensor" (psutil) or "simulated" (energy model)
    energy_j: float | None = None        # energy the device spent since start (simulated battery)
    compute_s: float = 0.0               # compute seconds since start (slowdown included)
    power: PowerSpec | None = None       # a battery device's power figures (the planner's device energy model)
    memory_limit_mb: float | None = None  # weights this server may hold (the planner's memory limit); None: any
    # what its health endpoints say (observability): why it is not ready (None: ready), where its /metrics are
    not_ready: str | None = None
    metrics_url: str | None = None
    runtimes: list[str] | None = None    # the part runtimes it can load (None: not said: any)


class ActorInfo(Frozen):
    """The registry's entry for one actor."""

    actor_id: str
    kind: str
    site: str = ""
    capacity: float = 1.0
    parts: list[PartRef] = Field(default_factory=list)
    alive: bool = True
    last_seen: float = 0.0
    state: ServerState = Field(default_factory=ServerState)


class LinkState(Frozen):
    """A directed link as measured by a network monitor: src_site -> dst_site."""

    src_site: str
    dst_site: str
    rtt_ms: float
    bandwidth_mbps: float | None = None  # None: too fast to measure with the probe size
    measured_at: float = Field(default_factory=time.time)
    by: str = ""                         # the probing actor
    target: str = ""                     # the actor probed


class LinkReport(Message):
    """A network monitor's measurement, pushed to the state pool (control key `state.link`)."""

    TYPE: ClassVar[str] = "link_report"
    link: LinkState


class HopStat(Frozen):
    """Recent timings of one part of one deployment on one server, as the front end saw them in its answers
    (medians over a bounded window). `compute_s` counts batch-of-one calls only (None: none yet)."""

    deployment: Id
    part: str
    server: str
    transfer_s: float
    compute_s: float | None = None
    samples: int = 0


class DeploymentLatency(Frozen):
    """End-to-end latency of recent jobs answered on one deployment (a model's plan: `<model>:<plan>`)."""

    deployment: Id
    latency_s: float
    samples: int = 0
    since: float = 0.0  # wall clock of the window's oldest sample


class HopReport(Message):
    """A front end's recent hop timings and latencies, pushed to the state pool (control key `state.hops`): what
    the optimizer's cost model learns from."""

    TYPE: ClassVar[str] = "hop_report"
    source: Id
    hops: list[HopStat] = Field(default_factory=list)
    latencies: list[DeploymentLatency] = Field(default_factory=list)
    at: float = Field(default_factory=time.time)


class SetLinks(Message):
    """Change the emulated link table at run time (control key `links.set`, every actor that receives tensors
    follows it): a benchmark sweeps bandwidth without restarting actors. `replace` drops links not listed;
    `emulate` None leaves emulation on/off as it is; `default` None leaves the default link as it is."""

    TYPE: ClassVar[str] = "set_links"
    links: dict[str, LinkSpec] = Field(default_factory=dict)  # "siteA-siteB"
    default: LinkSpec | None = None
    emulate: bool | None = None
    replace: bool = True


class Probe(Message):
    """Network-monitor probe (control key `probe.<actor>`, RPC): the receiver delays it as a tensor of
    len(payload) bytes from `site`, then answers a ProbeReply of `reply_bytes` bytes."""

    TYPE: ClassVar[str] = "probe"
    probe_id: Id
    site: str = ""
    payload: bytes = b""
    reply_bytes: int = Field(0, ge=0, le=16 * 1024 * 1024)  # the reply carries this many bytes (the way back)


class ProbeReply(Message):
    TYPE: ClassVar[str] = "probe_reply"
    probe_id: Id
    site: str = ""
    payload: bytes = b""


class WhoHosts(Message):
    """Registry query (RPC): live actors, optionally only those hosting a deployment / part."""

    TYPE: ClassVar[str] = "who_hosts"
    deployment: str | None = None
    part: str | None = None
    include_dead: bool = False


class Hosts(Message):
    """The registry's answer to WhoHosts."""

    TYPE: ClassVar[str] = "hosts"
    actors: list[ActorInfo] = Field(default_factory=list)


class GetState(Message):
    """State-pool query (control key `state_pool.query`, RPC) -> ClusterState."""

    TYPE: ClassVar[str] = "get_state"
    include_dead: bool = False


class ClusterState(Message):
    """The latest state of every actor (server and device monitors: ActorInfo.state) and every measured link."""

    TYPE: ClassVar[str] = "cluster_state"
    actors: list[ActorInfo] = Field(default_factory=list)
    links: list[LinkState] = Field(default_factory=list)
    hops: list[HopStat] = Field(default_factory=list)            # the front ends' latest hop reports, merged
    latencies: list[DeploymentLatency] = Field(default_factory=list)
    at: float = Field(default_factory=time.time)

    def servers(self) -> list[ActorInfo]:
        return [a for a in self.actors if a.kind == "model_server"]

    def link(self, src_site: str, dst_site: str) -> LinkState | None:
        return next((x for x in self.links if x.src_site == src_site and x.dst_site == dst_site), None)
