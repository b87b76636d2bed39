"""Timing compiled functions on a noisy shared machine: warm-up, interleaved rounds, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Literal

from splitinfer.monitor.machine import tf_threads

Call = tuple[Callable, Sequence]  # a compiled function and the arguments to call it with
Clock = Literal["wall", "cpu"]


def default_clock() -> Clock:
    """"cpu" when TF runs one op at a time (one intra-op and one inter-op thread, as servers are configured):
    then the process's CPU time per call equals the call's latency on an idle core, and other processes that
    preempt this one do not inflate it. With more threads CPU time adds up over threads, so "wall"."""
    return "cpu" if tf_threads() == (1, 1) else "wall"


def interleaved_ms(
    calls: Sequence[Call],
    rounds: int,
    warmup: int = 3,
    on_round: Callable[[int], None] | None = None,
    clock: Clock = "wall",
) -> list[list[float]]:
    """Milliseconds of every call in every round, by wall clock or by this process's CPU time.

    Each round calls every function once, in order, so a burst of load from another process slows all of
    them alike instead of one; medians over rounds then resist the noise of a shared machine. Wall-clock
    medians still grow with sustained load, and more for long calls than for short ones (a long call is
    preempted more often), which the "cpu" clock avoids when TF is single-threaded.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', not {clock!r}")
    wall, cpu = interleaved_both(calls, rounds, warmup, on_round)
    return wall if clock == "wall" else cpu


def interleaved_both(
    calls: Sequence[Call],
    rounds: int,
    warmup: int = 3,
    on_round: Callable[[int], None] | None = None,
) -> tuple[list[list[float]], list[list[float]]]:
    """(wall-clock ms, process CPU ms) of every call in every round; see interleaved_ms."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    for _ in range(warmup):
        for fn, args in calls:
            fn(*args)
    wall: list[list[float]] = [[] for _ in calls]
    cpu: list[list[float]] = [[] for _ in calls]
    perf, proc = time.perf_counter, time.process_time
    for r in range(rounds):
        for i, (fn, args) in enumerate(calls):
            t0, c0 = perf(), proc()
            fn(*args)  # eager execution of a concrete function on CPU returns when the outputs are ready
            c1, t1 = proc(), perf()
            wall[i].append((t1 - t0) * 1e3)
            cpu[i].append((c1 - c0) * 1e3)
        if on_round:
            on_round(r + 1)
    return wall, cpu


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def iqr(values: Sequence[float]) -> float:
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return float(q[2] - q[0])


def trivial_call():
    """A compiled function that does (almost) nothing: its call time is the fixed cost of calling a part."""
    import tensorflow as tf  # lazy: loads TensorFlow; profile and calibration import this module without it

    x = tf.constant([1.0])
    fn = tf.function(lambda v: v * 2.0, autograph=False).get_concrete_function(tf.TensorSpec([1], tf.float32))
    return fn, (x,)
