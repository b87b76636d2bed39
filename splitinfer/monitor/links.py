"""Link emulation between sites: the delay a tensor takes from site A to site B, with FIFO links. Pure.

Why: one machine runs the whole cluster in tests and benchmarks, so the device-edge-cloud network has to be
emulated for measured latencies to mean something. The delay is the planner's hop cost (planner/costmodel.py):
one hop of tensors from a to b costs rtt(a, b) + sum of bytes / bandwidth. The planner charges the FULL round-trip
time per hop (a publish waits for its confirm across the link: one round trip), so the emulation does the same:
a tensor arrives RTT + bytes/bandwidth after it was handed to the link (not RTT/2), and measured and predicted
latencies agree.

A directed link (A -> B) carries one transfer at a time, first come first served: a transfer starts at
max(now, the link's busy-until time), occupies the link for bytes / bandwidth, then arrives RTT later (the RTT
is propagation, it does not occupy the link). So concurrent transfers share the bandwidth, and several tensors of
one hop arrive RTT + (sum of their bytes) / bandwidth after the first left: exactly the planner's hop.

The state is per receiving actor (each receiver delays what it receives): two receivers at one site do not
share a link's FIFO. That is enough for one request at a time and for one consumer per link.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from splitinfer.messages import split_pair

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class LinkParams:
    rtt_s: float = 0.0
    bandwidth: float = math.inf  # bytes/s

    def transfer_s(self, nbytes: float) -> float:
        """Time on an idle link: the planner's hop cost of one tensor (without the broker's own overhead)."""
        return self.rtt_s + self.wire_s(nbytes)

    def wire_s(self, nbytes: float) -> float:
        return nbytes / self.bandwidth if self.bandwidth != math.inf else 0.0


def link_params(spec) -> LinkParams:
    """A settings/messages LinkSpec (rtt_ms, bandwidth_mbps or None) or a (rtt_s, bytes/s) pair -> LinkParams."""
    if isinstance(spec, LinkParams):
        return spec
    if isinstance(spec, (tuple, list)):
        rtt, bw = spec
        return LinkParams(float(rtt), math.inf if bw is None else float(bw))
    bw = getattr(spec, "bandwidth_mbps", None)
    return LinkParams(float(spec.rtt_ms) / 1e3, math.inf if bw is None else float(bw) * MBIT)


class LinkTable:
    """Symmetric link figures per pair of sites; unlisted pairs of different sites get `default`, a site to
    itself is instant unless listed as 'a-a'."""

    def __init__(self, links: Mapping[str, object] | None = None, default=None):
        self.links: dict[frozenset, LinkParams] = {}
        self.specs: dict[str, LinkParams] = {}
        for key, spec in (links or {}).items():
            a, b = split_pair(key)
            self.specs[key] = self.links[frozenset((a, b))] = link_params(spec)
        self.default = link_params(default) if default is not None else LinkParams()

    def get(self, a: str, b: str) -> LinkParams:
        found = self.links.get(frozenset((a, b)))
        if found is not None:
            return found
        return LinkParams() if a == b else self.default


class LinkEmulator:
    """The receiving side's emulated links: `arrival(src, dst, nbytes, now)` books the transfer on the directed
    link and returns when it arrives; `delay(...)` is that minus now. Disabled: always 0 (adds nothing)."""

    def __init__(self, table: LinkTable | None = None, enabled: bool = False):
        self.table = table or LinkTable()
        self.enabled = enabled
        self.busy_until: dict[tuple[str, str], float] = {}

    @classmethod
    def from_settings(cls, settings) -> "LinkEmulator":
        return cls(LinkTable(settings.links, settings.default_link), settings.emulate_links)

    def update(self, links: Mapping[str, object] | None = None, default=None, emulate: bool | None = None,
               replace: bool = True) -> None:
        """Apply a SetLinks order. Busy links stay busy with what they already carry."""
        merged: dict[str, object] = {} if replace else dict(self.table.specs)
        for key, spec in (links or {}).items():  # a pair given as "b-a" replaces an old "a-b"
            pair = set(split_pair(key))
            merged = {k: v for k, v in merged.items() if set(split_pair(k)) != pair}
            merged[key] = spec
        self.table = LinkTable(merged, default if default is not None else self.table.default)
        if emulate is not None:
            self.enabled = emulate

    def arrival(self, src: str, dst: str, nbytes: float, now: float) -> float:
        if not self.enabled or not src or not dst:
            return now
        link = self.table.get(src, dst)
        if link.rtt_s == 0 and link.bandwidth == math.inf:
            return now
        start = max(now, self.busy_until.get((src, dst), 0.0))
        done = start + link.wire_s(nbytes)
        self.busy_until[(src, dst)] = done
        return done + link.rtt_s

    def delay(self, src: str, dst: str, nbytes: float, now: float) -> float:
        return max(0.0, self.arrival(src, dst, nbytes, now) - now)

    def wire_s(self, src: str, dst: str, nbytes: float) -> float:
        """bytes / bandwidth on the link (radio time for a device's energy), 0 when not emulated."""
        if not self.enabled or not src or not dst or src == dst:
            return 0.0
        return self.table.get(src, dst).wire_s(nbytes)

    def slowest_from(self, site: str) -> LinkParams | None:
        """The narrowest link touching `site` (where a device's outputs go when their receiver is unknown)."""
        links = [p for k, p in self.table.links.items() if site in k and len(k) == 2]
        if self.table.default.bandwidth != math.inf:
            links.append(self.table.default)
        return min(links, key=lambda p: p.bandwidth) if links else None


def estimate_link(small_s: list[float], large_s: list[float], large_bytes: int, small_bytes: int = 0
                  ) -> tuple[float, float | None]:
    """(rtt seconds, bandwidth bytes/s or None) from probe round trips: a small probe there and back costs two
    hops (2 x rtt in the planner's terms), a large one costs the same plus its extra bytes / bandwidth. Medians
    resist one slow sample. The bandwidth is None when the large probe was not measurably slower."""
    if not small_s or not large_s:
        raise ValueError("need at least one small and one large probe")
    small = _median(small_s)
    large = _median(large_s)
    rtt = small / 2
    extra = large - small
    bandwidth = (large_bytes - small_bytes) / extra if extra > 1e-4 else None
    return rtt, bandwidth


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
