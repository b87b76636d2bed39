"""A bounded window of the hop timings answers carry, summarised as medians. Pure.

Why here: every answer already says where its time went (messages.Hop, per part: transfer, queue, compute, batch);
the front end folds them into this window and reports the summary (messages.HopReport) so the optimizer's cost
model can learn what the cluster really does. Medians over the last `size` samples of the last `max_age_s`: one
slow job (a GC pause, a probe sharing the link) moves nothing, a lasting change moves the median within half a
window. A deployment's latency says since when its window runs, so that a reader can tell a window that spans a
change of the links from one that does not.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterable, Sequence

from splitinfer.messages import DeploymentLatency, HopStat
from splitinfer.messages.frames import HOP_FIELDS, TRIP_HOPS

WINDOW = 32        # samples kept per (deployment, part, server) and per deployment
MAX_AGE_S = 60.0   # and none older: a window describes the cluster as it is now

_I = {f: i for i, f in enumerate(HOP_FIELDS)}


class HopWindow:
    def __init__(self, size: int = WINDOW, max_age_s: float = MAX_AGE_S):
        self.size = size
        self.max_age_s = max_age_s
        # each window holds (wall-clock time, seconds)
        self.transfer: dict[tuple[str, str, str], deque[tuple[float, float]]] = {}
        self.compute: dict[tuple[str, str, str], deque[tuple[float, float]]] = {}
        self.latency: dict[str, deque[tuple[float, float]]] = {}
        self.now = time.time

    def _window(self, table: dict, key) -> deque:
        if key not in table:
            table[key] = deque(maxlen=self.size)
        return table[key]

    def add(self, deployment: str, hops: Iterable[Sequence], latency_s: float | None = None) -> None:
        """One answered job: its hops (each in frames.HOP_FIELDS order) and its end-to-end latency."""
        at = self.now()
        for h in hops:
            part, server = str(h[_I["part"]]), str(h[_I["server"]])
            if part in TRIP_HOPS[:1]:
                continue  # the job's own trip to the front end is not a part's
            key = (deployment, part, server)
            via = h[_I["via"]] if len(h) > _I["via"] else "broker"
            if via == "broker":  # a local hand-off between co-located parts is no hop
                self._window(self.transfer, key).append((at, float(h[_I["transfer_s"]])))
            if part not in TRIP_HOPS and int(h[_I["batch"]]) == 1:
                self._window(self.compute, key).append((at, float(h[_I["compute_s"]])))
        if latency_s is not None:
            self._window(self.latency, deployment).append((at, float(latency_s)))

    def forget(self, deployment: str) -> None:
        for table in (self.transfer, self.compute):
            for key in [k for k in table if k[0] == deployment]:
                del table[key]
        self.latency.pop(deployment, None)

    def _prune(self) -> None:
        oldest = self.now() - self.max_age_s
        for table in (self.transfer, self.compute, self.latency):
            for key in list(table):
                window = table[key]
                while window and window[0][0] < oldest:
                    window.popleft()
                if not window:
                    del table[key]

    def summary(self) -> tuple[list[HopStat], list[DeploymentLatency]]:
        self._prune()
        keys = sorted(set(self.transfer) | set(self.compute))
        hops = []
        for key in keys:
            t, c = self.transfer.get(key, ()), self.compute.get(key, ())
            hops.append(HopStat(deployment=key[0], part=key[1], server=key[2],
                                transfer_s=statistics.median(v for _, v in t) if t else 0.0,
                                compute_s=statistics.median(v for _, v in c) if c else None,
                                samples=max(len(t), len(c))))
        lat = [DeploymentLatency(deployment=d, latency_s=statistics.median(v for _, v in w), samples=len(w),
                                 since=w[0][0])
               for d, w in sorted(self.latency.items())]
        return hops, lat
