"""Runtime monitors' pure parts: system load of this process/machine, the server's speed, and the battery.

Why: the optimizer and the front end choose plans by each server's load and speed and by the device's battery;
these functions gather them without any broker code (actors/model_server.py puts them in its heartbeat state,
which the state pool keeps).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import psutil

from splitinfer.monitor.cache import calibration_path
from splitinfer.monitor.calibration import Calibration
from splitinfer.monitor.machine import machine_info


def system_load() -> dict:
    """cpu_percent (this process, since the last call), memory_mb (RSS), load_avg (1 min); None when unknown."""
    out: dict = {"cpu_percent": None, "memory_mb": None, "load_avg": None}
    try:
        proc = _process()
        out["cpu_percent"] = proc.cpu_percent(None)
        out["memory_mb"] = proc.memory_info().rss / 1e6
    except Exception:
        pass
    try:
        out["load_avg"] = os.getloadavg()[0]
    except (OSError, AttributeError):
        pass
    return out


_PROC = None


def _process():
    """One psutil.Process per process: cpu_percent(None) measures since the previous call on the same object."""
    global _PROC
    if _PROC is None or _PROC.pid != os.getpid():
        _PROC = psutil.Process()
    return _PROC


def cached_speed_gflops(cache_dir=None) -> float | None:
    """This machine's convolution GFLOP/s from the cached calibration (`splitinfer profile` makes one), without
    measuring anything: None when there is none. Costs a TF import (a model server has it anyway)."""
    try:
        path = calibration_path(machine_info().fingerprint, cache_dir)
        if path.exists():
            return float(Calibration.load(path).conv_gflops)
    except Exception:
        return None
    return None


def speed_gflops(cache_dir=None, measure: bool = True) -> float | None:
    """This machine's convolution GFLOP/s: its cached calibration, or (`measure`) one measured now and cached,
    once per machine: processes starting together wait for the first one's measurement instead of all measuring
    at once on the same cores."""
    cached = cached_speed_gflops(cache_dir)
    if cached is not None or not measure:
        return cached
    import fcntl

    from splitinfer.monitor.calibration import load_or_calibrate

    path = calibration_path(machine_info().fingerprint, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = cached_speed_gflops(cache_dir)
        if cached is not None:
            return cached
        return float(load_or_calibrate(cache_dir=cache_dir).conv_gflops)


def read_battery() -> float | None:
    """The real battery level 0..1 from psutil.sensors_battery(), None when the machine has none."""
    try:
        b = psutil.sensors_battery()
    except Exception:
        return None
    return None if b is None else max(0.0, min(1.0, float(b.percent) / 100.0))


@dataclass
class BatterySim:
    """A simulated battery drained by the planner's device energy model (planner/costmodel.py):
    compute_w x compute time + radio_w x radio time + idle_w x the rest of the wall time.

    `account(compute_s, radio_s, now)` charges the interval since the previous call; compute and radio are the
    seconds spent in that interval (radio: bytes / bandwidth of the tensors the device sent or received)."""

    compute_w: float
    radio_w: float
    idle_w: float
    capacity_j: float
    level: float = 1.0
    energy_j: float = 0.0
    last: float = field(default_factory=time.time)

    @classmethod
    def from_power(cls, power, capacity_j: float, now: float | None = None) -> "BatterySim":
        return cls(power.compute_w, power.radio_w, power.idle_w, capacity_j,
                   last=time.time() if now is None else now)

    def energy(self, compute_s: float, radio_s: float, wall_s: float) -> float:
        idle = max(0.0, wall_s - compute_s - radio_s)
        return self.compute_w * compute_s + self.radio_w * radio_s + self.idle_w * idle

    def account(self, compute_s: float, radio_s: float, now: float | None = None) -> float:
        """Charge the interval since the last call; returns the level (0..1)."""
        now = time.time() if now is None else now
        wall = max(0.0, now - self.last)
        self.last = now
        e = self.energy(compute_s, radio_s, max(wall, compute_s + radio_s))
        self.energy_j += e
        self.level = max(0.0, self.level - e / self.capacity_j)
        return self.level
