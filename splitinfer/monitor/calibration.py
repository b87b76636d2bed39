"""How fast this machine is, and predicting a part's latency on one machine from a profile taken on another.

A calibration is a handful of compiled micro-benchmarks run with the TF thread settings of this process:
sustained GFLOP/s of a 3x3 convolution and of a matrix product (the two kinds of work that carry most FLOPs),
memory bandwidth of a large element-wise pass, and the fixed cost of one compiled call.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from splitinfer.monitor.cache import calibration_path
from splitinfer.monitor.document import VersionedDocument
from splitinfer.monitor.machine import MachineInfo, machine_info
from splitinfer.monitor.profile import ModelProfile, OpProfile
from splitinfer.monitor.timing import default_clock, interleaved_ms, median, trivial_call

CALIBRATION_FORMAT = "splitinfer.calibration"
CALIBRATION_VERSION = 1


class Calibration(VersionedDocument):
    FORMAT: ClassVar[str] = CALIBRATION_FORMAT
    VERSION: ClassVar[int] = CALIBRATION_VERSION
    format: str = CALIBRATION_FORMAT
    version: int = CALIBRATION_VERSION
    machine: MachineInfo
    created: str
    conv_gflops: float = Field(description="sustained GFLOP/s, 3x3 convolution 56x56x64->64, batch 1")
    dense_gflops: float = Field(description="sustained GFLOP/s, matrix product 128x1024 @ 1024x1024")
    memory_gbps: float = Field(description="GB/s read+written by an element-wise pass over 32 MB")
    call_overhead_ms: float = Field(description="median time of an empty compiled call")
    clock: Literal["wall", "cpu"] = Field("wall", description="as in ModelProfile: CPU time when TF is single-threaded")
    rounds: int
    seconds: float

    def rate_gflops(self, kind: str) -> float:
        """The compute rate that scales an operation of this kind (`other` ops scale like convolutions)."""
        return self.dense_gflops if kind == "dense" else self.conv_gflops


def calibrate(rounds: int = 30, progress: Callable[[str, int, int], None] | None = None,
              clock: Literal["wall", "cpu"] | None = None) -> Calibration:
    """Measure this machine now (a few seconds): interleaved rounds of every workload, medians. `clock` defaults
    to CPU time when TF is single-threaded (the speed of an idle core), else wall clock."""
    from splitinfer import _tf  # noqa: F401  (lazy: loads TensorFlow, which reading a Calibration does not need)
    import tensorflow as tf  # lazy: loads TensorFlow

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    report = progress or (lambda *_: None)

    image = tf.constant(rng.uniform(size=(1, 56, 56, 64)).astype(np.float32))
    kernel = tf.constant(rng.uniform(size=(3, 3, 64, 64)).astype(np.float32) * 0.01)
    conv = tf.function(lambda x: tf.nn.conv2d(x, kernel, 1, "SAME"), autograph=False).get_concrete_function(
        tf.TensorSpec(image.shape, tf.float32))
    conv_flops = 2 * 56 * 56 * 64 * 64 * 9

    a = tf.constant(rng.uniform(size=(128, 1024)).astype(np.float32))
    b = tf.constant(rng.uniform(size=(1024, 1024)).astype(np.float32) * 0.01)
    dense = tf.function(lambda x: tf.matmul(x, b), autograph=False).get_concrete_function(tf.TensorSpec(a.shape, tf.float32))
    dense_flops = 2 * 128 * 1024 * 1024

    big = tf.constant(rng.uniform(size=(8 * 1024 * 1024,)).astype(np.float32))
    stream = tf.function(lambda x: x * 1.5, autograph=False).get_concrete_function(tf.TensorSpec(big.shape, tf.float32))
    stream_bytes = 2 * big.shape[0] * 4  # read once, write once

    calls = [trivial_call(), (conv, (image,)), (dense, (a,)), (stream, (big,))]
    report("calibrating", 0, rounds)
    clock = clock or default_clock()
    times = interleaved_ms(calls, rounds, warmup=3, on_round=lambda r: report("calibrating", r, rounds), clock=clock)
    overhead = median(times[0])

    def rate(ms: float, work: float) -> float:
        return work / max(ms - overhead, 1e-3) / 1e6  # per ms -> per s, in G

    return Calibration(
        machine=machine_info(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        conv_gflops=rate(median(times[1]), conv_flops),
        dense_gflops=rate(median(times[2]), dense_flops),
        memory_gbps=rate(median(times[3]), stream_bytes),
        call_overhead_ms=overhead,
        clock=clock,
        rounds=rounds,
        seconds=round(time.perf_counter() - started, 2),
    )


def load_or_calibrate(refresh: bool = False, cache_dir: Path | None = None, rounds: int = 30) -> Calibration:
    """This machine's cached calibration (settings.cache_dir/calibration/<fingerprint>.json), measured if missing."""
    path = calibration_path(machine_info().fingerprint, cache_dir)
    return Calibration.cached(path, lambda: calibrate(rounds=rounds), read=not refresh)


def predict_latency(
    work,
    calibration_from: Calibration | None,
    calibration_to: Calibration | None = None,
    *,
    calls: int = 1,
    overhead_ms: float | None = None,
) -> float:
    """Predicted milliseconds to run `work` as `calls` compiled call(s) on the machine of `calibration_to`.

    `work` is what the planner has for a part:
      - a list of OpProfile (a part's operations from a ModelProfile measured on the machine of
        `calibration_from`): each op's measured latency is split into compute, memory and fixed parts;
        compute scales by the ratio of GFLOP/s for its kind (conv or dense; other ops like conv), memory by
        the ratio of memory bandwidths, the fixed per-op part and the per-call overhead by the ratio of call
        overheads;
      - a ModelProfile: its whole model, likewise, as one call;
      - a number of FLOPs (no profile): FLOPs at the target's convolution rate plus its call overhead
        (calibration_from is then unused and may be None).
    `overhead_ms` is the per-call overhead measured on the source machine (default: the profile's when `work`
    is a ModelProfile, else calibration_from's). With `calibration_to` None the profiled machine is predicted.
    """
    to = calibration_to or calibration_from
    if isinstance(work, (int, float, np.integer, np.floating)):
        if to is None:
            raise ValueError("predicting from FLOPs alone needs the target machine's calibration")
        return float(work) / (to.conv_gflops * 1e9) * 1e3 + calls * to.call_overhead_ms
    if calibration_from is None:
        raise ValueError("scaling a measured profile needs the calibration of the machine it was measured on")
    if isinstance(work, ModelProfile):
        ops = [o for o in work.ops if not o.is_input]
        if overhead_ms is None:
            overhead_ms = work.totals.call_overhead_ms
    else:
        ops = list(work)
        if not all(isinstance(o, OpProfile) for o in ops):
            raise TypeError("work must be a ModelProfile, a list of OpProfile or a number of FLOPs")
    cf, ct = calibration_from, to
    if overhead_ms is None:
        overhead_ms = cf.call_overhead_ms
    overhead_ratio = ct.call_overhead_ms / cf.call_overhead_ms if cf.call_overhead_ms > 0 else 1.0
    bandwidth_ratio = cf.memory_gbps / ct.memory_gbps if ct.memory_gbps > 0 else 1.0
    total = 0.0
    for o in ops:
        compute_ratio = cf.rate_gflops(o.kind) / ct.rate_gflops(o.kind)
        total += o.compute_ms * compute_ratio + o.memory_ms * bandwidth_ratio + o.fixed_ms * overhead_ratio
    return total + calls * overhead_ms * overhead_ratio


def predict_part_latency(profile, operations: Iterable[str], calibration_from: Calibration,
                         calibration_to: Calibration | None = None) -> float:
    """predict_latency of the part of `profile` made of these operation names, run as one compiled call;
    the call overhead is the one measured with the profile."""
    return predict_latency(profile.ops_named(operations), calibration_from, calibration_to,
                           overhead_ms=profile.totals.call_overhead_ms)


def speed_factor(work, calibration_from: Calibration, calibration_to: Calibration) -> float:
    """How many times faster the machine of `calibration_to` runs `work` (a ModelProfile or list of OpProfile)
    than the profiled machine, call overheads left out: the planner's server `speed` when node costs are the
    profile's seconds (`ModelProfile.op_seconds()`)."""
    here = predict_latency(work, calibration_from, calibration_from, calls=0)
    there = predict_latency(work, calibration_from, calibration_to, calls=0)
    return here / there if there > 0 else 1.0
