"""Each part of a split timed on each runtime it has a file for (tf.function, ONNX Runtime, LiteRT), and the
fastest one chosen per part: the figures the manifest keeps (`runtime_ms`) for the planner and the servers.

Timing: warm-up calls, then the median of `rounds` calls at `batch`, in this process with the intra-op threads
the servers use; the runtimes alternate call by call, so a noisy neighbour slows all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.manifest import Manifest
from splitinfer.splitter.runtimes import available_runtimes, load_part
from splitinfer.splitter.tensors import random_inputs

WARMUP = 3


def time_call(fn: Callable, arg, rounds: int) -> list[float]:
    """Seconds of `rounds` calls of fn(arg) after WARMUP untimed ones."""
    for _ in range(WARMUP):
        fn(arg)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(arg)
        out.append(time.perf_counter() - t0)
    return out


def measure_runtimes(directory: Path, manifest: Manifest, runtimes: Sequence[str] | None = None, *,
                     batch: int = 1, rounds: int = 20, threads: int | None = None,
                     progress: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """{part: {runtime: median ms}} for every runtime (of `runtimes`, default all installed) a part has a file for."""
    wanted = [r for r in (runtimes or available_runtimes()) if r in available_runtimes()]
    measured: dict[str, dict[str, float]] = {}
    for entry in manifest.parts:
        inputs = random_inputs(entry.inputs, batch, 0)
        loaded = {r: load_part(directory, entry, r, threads) for r in entry.runtimes if r in wanted}
        samples: dict[str, list[float]] = {r: [] for r in loaded}
        for r, part in loaded.items():
            time_call(part, inputs, 0)
        for _ in range(rounds):
            for r, part in loaded.items():
                samples[r] += time_call(part, inputs, 1)[-1:]
        measured[entry.name] = {r: 1e3 * statistics.median(s) for r, s in samples.items()}
        if progress:
            progress(entry.name)
    return measured


def choose_runtimes(manifest: Manifest, measured: dict[str, dict[str, float]], fixed: str | None = None) -> Manifest:
    """The manifest with each part's measured times, and its runtime: `fixed` for every part (refused for a part
    with no file for it), else the fastest measured."""
    for entry in manifest.parts:
        entry.runtime_ms = {r: round(ms, 4) for r, ms in measured.get(entry.name, {}).items()}
        if fixed is not None:
            if fixed not in entry.runtimes:
                raise SplitError(f"part {entry.name} has no file for runtime {fixed} (it has {', '.join(entry.runtimes)})")
            entry.runtime = fixed
        elif entry.runtime_ms:
            entry.runtime = min(entry.runtime_ms, key=entry.runtime_ms.get)
    return manifest
