"""Running a part: TensorFlow's thread pools (and each ONNX Runtime session's) as the settings say, a part loaded and traced before it serves, and
the emulated slowdown of a slower device. The model server calls these in its worker thread."""

from __future__ import annotations

import collections
import contextlib
import statistics
from pathlib import Path

from splitinfer import _tf  # noqa: F401  (quiet TensorFlow import: a model server always runs TF)
import tensorflow as tf

from splitinfer.config import Settings
from splitinfer.splitter.runtimes import available_runtimes, load_part
from splitinfer.splitter.tensors import random_inputs
from splitinfer.splitter.manifest import PartEntry


def configure_tf(settings: Settings) -> None:
    """settings.intra_op_threads per process, so that several server processes don't each claim every core."""
    with contextlib.suppress(RuntimeError):  # already initialised: keep what is set
        tf.config.threading.set_intra_op_parallelism_threads(settings.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(settings.inter_op_threads)


def load_and_warm(directory: Path, entry: PartEntry, max_batch: int, threads: int | None = None):
    """Load the part on the runtime its entry names (sha256-checked; a .keras file with safe_mode), or on another
    it has a file for when that one is not installed here, then run it so the first request doesn't pay for
    tracing or the runtime's first-call set-up."""
    runtime = entry.runtime_name
    if runtime not in available_runtimes():  # not installed here: another runtime the part has a file for
        runtime = next((r for r in entry.runtimes if r in available_runtimes()), runtime)
    part = load_part(directory, entry, runtime, threads=threads)
    part(random_inputs(entry.inputs, 1, 0))
    if max_batch > 1:  # a second batch size makes reduce_retracing generalise the batch dimension once
        part(random_inputs(entry.inputs, 2, 0))
        part(random_inputs(entry.inputs, 3, 0))
    return part


class EmulatedSlowdown:
    """A server `slowdown` times slower: after each batch the worker idles (slowdown - 1) x the *median* of this
    part's recent compute times at that batch size. Scaling the call's own time would multiply the shared
    machine's jitter by the slowdown (x10 on a phone-like device); the call's real time still counts in full."""

    WINDOW = 15  # recent calls per batch size

    def __init__(self, slowdown: float):
        self.slowdown = max(1.0, slowdown)
        self._recent: dict[int, collections.deque] = {}

    def extra_s(self, batch: int, compute_s: float) -> float:
        if self.slowdown <= 1.0:
            return 0.0
        recent = self._recent.setdefault(batch, collections.deque(maxlen=self.WINDOW))
        recent.append(compute_s)
        return (self.slowdown - 1.0) * statistics.median(recent)
