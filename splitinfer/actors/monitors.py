"""The broker side of the runtime monitors and of link emulation.

- `follow_links(actor)`: an exclusive queue of the actor's own on `<ns>.control`, bound to `links.set` (every
  SetLinks order reaches every actor that follows, so a benchmark changes the emulated links at run time without
  restarting anything) and to `probe.<actor id>` (it answers network probes, delayed like a tensor would be).
- `ServerMonitor`: what a model server puts in its heartbeat state (which the registry and the state pool keep):
  CPU, memory, load average, speed (cached calibration, else settings.speed_gflops), slowdown, site, and for a
  battery device its battery level (psutil sensor, else simulated by the planner's energy model).
- `NetworkMonitor`: for each pair of sites A < B (by name), the first actor (by id) at A probes the first actor
  at B over the broker, through the same link emulation: empty probes (RTT), large probes there (A -> B
  bandwidth) and probes with a large reply (B -> A bandwidth), interleaved; it pushes both directed links
  (LinkReport, key `state.link`) to the state pool. One prober per pair, so two monitors' probes never queue
  behind each other on the emulated links (tensor traffic still does: that is what a real link would do).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.registry.client import RegistryClient
from splitinfer.actors.transport.topology import Names, escape_key
from splitinfer.messages import LinkReport, LinkState, MessageError, Probe, ProbeReply, ServerState, SetLinks
from splitinfer.monitor.links import MBIT, estimate_link
from splitinfer.monitor.runtime import BatterySim, read_battery

PROBE_KINDS = ("model_server", "front_end")  # actors that follow links and answer probes


async def follow_links(actor, probes: bool = True) -> None:
    """Follow SetLinks orders (and answer probes) on a queue of this actor's own (exclusive, auto-delete)."""
    names: Names = actor.names
    q = await actor.channel.declare_queue(f"{names.ns}.links.{escape_key(actor.id)}", exclusive=True,
                                          auto_delete=True)
    control = actor.exchanges["control"]
    await q.bind(control, routing_key=Names.LINKS_SET)
    if probes:
        await q.bind(control, routing_key=Names.probe_key(actor.id))

    async def on_message(message: AbstractIncomingMessage) -> None:
        await actor.deliveries.ack(message)  # exclusive queue: nothing to hand back
        try:
            msg = actor.decode(message, expect=(SetLinks, Probe))
        except MessageError as err:
            actor.log.warning("bad_control", error=err.reason)
            return
        if isinstance(msg, SetLinks):
            actor.links.update(msg.links, msg.default, msg.emulate, msg.replace)
            actor.log("links_set", emulate=actor.links.enabled,
                      links={k: [round(p.rtt_s * 1e3, 3), p.bandwidth / MBIT] for k, p in actor.links.table.specs.items()})
            return
        # a probe is a tensor of len(payload) bytes from msg.site: delay it as one, then answer
        delay = actor.links.delay(msg.site, actor.site, len(msg.payload), time.time())
        if delay > 0:
            await asyncio.sleep(delay)
        await actor.rpc.reply(message, ProbeReply(probe_id=msg.probe_id, site=actor.site, payload=bytes(msg.reply_bytes)))

    await actor.consume(q, on_message)


class ServerMonitor:
    """Counters a model server feeds (compute and radio seconds) and the state it reports from them."""

    def __init__(self, actor, slowdown: float = 1.0, battery: bool | None = None, speed_gflops: float | None = None,
                 power=None):
        self.actor = actor
        self.slowdown = slowdown
        settings = actor.settings
        flag = settings.battery if battery is None else battery
        self.is_device = flag if flag is not None else actor.site == "device"
        self.speed_gflops = speed_gflops if speed_gflops is not None else settings.speed_gflops
        self.compute_s = 0.0      # since start, slowdown included
        self.radio_s = 0.0
        self._charged = (0.0, 0.0)
        self.power = (power or settings.power) if self.is_device else None
        self.battery = BatterySim.from_power(self.power, settings.battery_capacity_j) if self.is_device else None

    def add_compute(self, seconds: float) -> None:
        self.compute_s += seconds

    def add_radio(self, seconds: float) -> None:
        self.radio_s += seconds

    def fill(self, state: ServerState) -> ServerState:
        """The actor's state with what this monitor knows: site, speed, slowdown, compute, battery."""
        update = {"site": self.actor.site, "slowdown": self.slowdown, "speed_gflops": self.speed_gflops,
                  "compute_s": self.compute_s, "memory_limit_mb": self.actor.settings.memory_limit_mb}
        if self.is_device:
            update["power"] = self.power
            real = read_battery()
            if real is not None:
                update.update(battery=real, battery_source="sensor")
            else:
                dc = self.compute_s - self._charged[0]
                dr = self.radio_s - self._charged[1]
                self._charged = (self.compute_s, self.radio_s)
                update.update(battery=self.battery.account(dc, dr), battery_source="simulated",
                              energy_j=self.battery.energy_j)
        return state.model_copy(update=update)


PROBE_BUDGET_S = 0.05       # a large probe should occupy a link about this long
PROBE_MIN_BYTES = 16 * 1024  # below this the bytes/bandwidth term drowns in the broker's per-message noise


class NetworkMonitor:
    """Measures the links from this actor's site to every other site (when it is the first actor of its site)."""

    def __init__(self, actor):
        self.actor = actor
        self.registry = RegistryClient(actor.rpc)
        self.last: dict[tuple[str, str], LinkState] = {}

    def start(self) -> None:
        if self.actor.settings.probe_interval_s > 0:  # 0 turns probing off (a benchmark that sets the links)
            self.actor.spawn(self._loop(), name="network_monitor")

    async def _loop(self) -> None:
        actor = self.actor
        await asyncio.sleep(min(actor.settings.probe_interval_s, 2 * actor.settings.heartbeat_interval_s))
        while not actor.stopping:
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                actor.log.warning("probe_round_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(actor.settings.probe_interval_s)

    async def targets(self) -> dict[str, str]:
        """site -> the actor to probe there, for every site named after ours; empty unless this actor is the
        first (by id) at its site."""
        actor = self.actor
        peers = sorted((a for a in await self.registry.who_hosts() if a.kind in PROBE_KINDS and a.site and a.alive),
                       key=lambda a: a.actor_id)
        mine = [a.actor_id for a in peers if a.site == actor.site]
        if not mine or mine[0] != actor.id:
            return {}
        out: dict[str, str] = {}
        for a in peers:
            if a.site > actor.site:
                out.setdefault(a.site, a.actor_id)
        return out

    async def round(self) -> list[LinkState]:
        out = []
        for site, target in (await self.targets()).items():
            for link in await self.measure(target, site):
                self.last[(link.src_site, link.dst_site)] = link
                out.append(link)
                await self.actor.publisher.publish("control", Names.LINK_STATE, LinkReport(link=link), mandatory=False)
                self.actor.log("link_measured", src_site=link.src_site, dst_site=link.dst_site, target=target,
                               rtt_ms=round(link.rtt_ms, 2),
                               bandwidth_mbps=None if link.bandwidth_mbps is None else round(link.bandwidth_mbps, 2))
        return out

    def probe_size(self, site: str) -> int:
        """The large probe: settings.probe_bytes, shrunk to ~PROBE_BUDGET_S of transfer on a link last measured
        slow, so that probing a 1 Mbit/s link does not hold it (and the tensors queued behind) for seconds."""
        size = self.actor.settings.probe_bytes
        known = [link.bandwidth_mbps for (a, b), link in self.last.items()
                 if {a, b} == {self.actor.site, site} and link.bandwidth_mbps]
        if known:
            size = min(size, max(PROBE_MIN_BYTES, int(min(known) * MBIT * PROBE_BUDGET_S)))
        return size

    async def measure(self, target: str, site: str) -> list[LinkState]:
        """Empty, large-there and large-back probes, interleaved, to `target` at `site`; each round trip includes
        the emulated delay of the probe there (applied by the target) and of the reply back (applied here, as its
        receiver). Returns [our site -> site, site -> our site]."""
        actor = self.actor
        size = self.probe_size(site)
        small: list[float] = []
        there: list[float] = []
        back: list[float] = []
        for _ in range(actor.settings.probe_rounds):
            for out_bytes, back_bytes, out in ((0, 0, small), (size, 0, there), (0, size, back)):
                t0 = time.perf_counter()
                reply = await actor.rpc.call(
                    Names.probe_key(target), Probe(probe_id=uuid.uuid4().hex, site=actor.site, payload=bytes(out_bytes),
                                                   reply_bytes=back_bytes),
                    expect=ProbeReply, timeout=max(actor.settings.rpc_timeout_s, 60.0))
                wait = actor.links.delay(reply.site, actor.site, len(reply.payload), time.time())
                if wait > 0:
                    await asyncio.sleep(wait)
                out.append(time.perf_counter() - t0)
        links = []
        for src, dst, large in ((actor.site, site, there), (site, actor.site, back)):
            rtt, bw = estimate_link(small, large, size)
            links.append(LinkState(src_site=src, dst_site=dst, rtt_ms=rtt * 1e3,
                                   bandwidth_mbps=None if bw is None else bw / MBIT, by=actor.id, target=target))
        return links


