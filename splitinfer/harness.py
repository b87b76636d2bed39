"""The measuring harness `splitinfer demo` and the benchmarks share: a scratch cluster in this process, a split
made the way `splitinfer split --parts` makes it, the unsplit model as one compiled call, and the measurements
(latency per job, throughput, the largest error against the local model, where the time went hop by hop)."""

from __future__ import annotations

import asyncio
import collections
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from splitinfer.actors.supervisor import BrokerError, Supervisor
from splitinfer.actors.transport.topology import delete_namespace
from splitinfer.client import Client
from splitinfer.config import ClusterConfig, Settings
from splitinfer.messages import ResultMessage

ANSWER_HOP = "answer"


class HarnessError(Exception):
    """The scratch cluster could not start (the message says why in one line)."""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def make_split(model: str, parts: int, out: Path, seed: int = 0, exports: tuple[str, ...] = ()):
    """Split `model` into `parts` parts balanced by FLOPs (what `splitinfer split --parts` does), each part also
    saved in the `exports` formats."""
    from splitinfer.monitor import node_flops  # lazy: loads TensorFlow
    from splitinfer.splitter import load_graph, save_split
    from splitinfer.splitter.partition import balanced_split

    graph = load_graph(model, seed=seed)
    specs = balanced_split(graph, node_flops(graph), parts)
    return save_split(graph, specs, out, origin=model, exports=exports)


def local_runner(split_dir: Path):
    """The unsplit model from a split directory, compiled (one tf.function), warmed up: fn(x) -> outputs dict."""
    from splitinfer import _tf  # noqa: F401  (lazy: loads TensorFlow)
    import keras

    from splitinfer.splitter import CompiledPart, Manifest

    # Keras notes that a one-input model got its input as a list; the result is the same
    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
    manifest = Manifest.load(split_dir)
    model = keras.saving.load_model(split_dir / manifest.source.file, safe_mode=True, compile=False)
    return CompiledPart(model, [t.name for t in manifest.inputs], manifest.output_names)


def measure_local(run: Callable, xs: list, input_name: str) -> dict:
    """Latency of each call in sequence (the same inputs as the distributed run)."""
    for x in xs[:3]:
        run({input_name: x})
    lat, outs = [], []
    t_all = time.perf_counter()
    for x in xs:
        t0 = time.perf_counter()
        outs.append(run({input_name: x}))
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all
    return {"latency": lat, "outputs": outs, "throughput": len(xs) / wall}


async def measure_distributed(client: Client, deployment: str, xs: list, input_name: str, concurrency: int,
                              deadline_s: float = 60.0) -> dict:
    """Send every x as a job, at most `concurrency` in flight; latency per job as the client saw it."""
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = [0.0] * len(xs)
    results: list = [None] * len(xs)

    async def one(i: int, x) -> None:
        async with sem:
            t0 = time.perf_counter()
            results[i] = await client.infer(deployment, {input_name: x}, deadline_s=deadline_s)
            lat[i] = time.perf_counter() - t0

    t_all = time.perf_counter()
    await asyncio.gather(*(one(i, x) for i, x in enumerate(xs)))
    wall = time.perf_counter() - t_all
    return {"latency": lat, "results": results, "throughput": len(xs) / wall}


def max_abs_error(results: list[ResultMessage], local_outputs: list[dict]) -> float:
    worst = 0.0
    for r, ref in zip(results, local_outputs):
        for name, want in ref.items():
            got = r.outputs[name]
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))))
    return worst


def hop_summary(results: list[ResultMessage]) -> list[dict]:
    """Mean per-hop times over results, in path order: where the time went. "job" is a job's trip to the front
    end (jobs published to `<ns>.jobs`), then each part (its inputs' trip, join and queue wait, compute, batch size,
    and whether the inputs came over the broker or from the part before it in-process), then "answer": the answer's
    trip from the part that produced it to the caller."""
    acc: dict[tuple[str, str], list] = {}
    via: dict[tuple[str, str], set] = {}
    for r in results:
        for h in r.hops:
            acc.setdefault((h.part, h.server), []).append(
                (h.transfer_s, h.join_wait_s, h.queue_wait_s, h.compute_s, h.batch))
            via.setdefault((h.part, h.server), set()).add(h.via)
    rows = []
    for (part, server), vals in acc.items():
        a = np.asarray(vals, dtype=np.float64)
        rows.append({"part": part, "server": server, "transfer_ms": a[:, 0].mean() * 1e3,
                     "join_wait_ms": a[:, 1].mean() * 1e3, "queue_ms": a[:, 2].mean() * 1e3,
                     "compute_ms": a[:, 3].mean() * 1e3, "mean_batch": a[:, 4].mean(),
                     "via": "/".join(sorted(via[(part, server)]))})

    def order(row: dict) -> tuple:
        part = row["part"]
        if part == "job":
            return (0, 0)
        if part == ANSWER_HOP:
            return (3, 0)
        if part.startswith("part") and part[4:].isdigit():
            return (1, int(part[4:]))
        return (2, 0)

    return sorted(rows, key=order)


async def run_split(c: Client, split: Path, xs: list, placement, concurrency: int, deployment: str) -> dict:
    """Deploy the split as placed, then its jobs one at a time (latency) and `concurrency` at a time (throughput)."""
    dep = await c.deploy(split, placement, deployment=deployment, timeout=600)
    input_name = dep.inputs[0]
    await measure_distributed(c, dep.deployment, xs[:3], input_name, 1)  # warm-up
    seq = await measure_distributed(c, dep.deployment, xs, input_name, 1)
    par = await measure_distributed(c, dep.deployment, xs, input_name, concurrency)
    return {"deployment": dep.deployment, "placement": dep.placement, "seq": seq, "par": par}


def summarize(r: dict, local: dict, loc_med: float) -> dict:
    """A run_split run against the local baseline: latency, throughput, error, hops, the batch sizes that formed."""
    med = percentile(r["seq"]["latency"], 50) * 1e3
    batches = collections.Counter(h.batch for res in r["par"]["results"] for h in res.hops
                                  if h.part.startswith("part"))
    return {
        "deployment": r["deployment"], "placement": r["placement"],
        "latency_median_ms": med, "latency_p99_ms": percentile(r["seq"]["latency"], 99) * 1e3,
        "latency_vs_local": med / loc_med,
        "throughput_per_s": r["par"]["throughput"], "throughput_c1_per_s": r["seq"]["throughput"],
        "throughput_vs_local": r["par"]["throughput"] / local["throughput"],
        "max_abs_error": max(max_abs_error(r["seq"]["results"], local["outputs"]),
                             max_abs_error(r["par"]["results"], local["outputs"])),
        "hops": hop_summary(r["seq"]["results"]),
        "batch_sizes": {str(k): v for k, v in sorted(batches.items())},
    }


class ClusterRun:
    """The demo's and the benchmarks' cluster: a Supervisor (and a private broker if none answers) in this process's
    event loop, in a namespace of its own, with a scratch cache directory (model pool, fetched parts, logs, and the
    result store unless SPLITINFER_RESULT_STORE_URL is set) that is removed after a clean run and kept, with a
    note saying where, after a failed one. Everything it started is stopped on exit."""

    def __init__(self, servers: int, settings: Settings, say: Callable[[str], None], queue_expires_s: float = 600.0,
                 config: ClusterConfig | None = None):
        self.say = say
        self.scratch = Path(settings.cache_dir) / "scratch" / settings.namespace
        self.settings = settings.model_copy(update={"queue_expires_s": queue_expires_s, "cache_dir": self.scratch,
                                                    "profile_dir": settings.profile_cache()})
        # a given config (sites, slowdowns, emulated links: the bandwidth benchmark) replaces the default servers
        cfg = config.model_copy() if config is not None else ClusterConfig.default(servers)
        cfg.namespace = self.settings.namespace
        self.keep_logs = False  # set: the scratch directory (logs) stays after a clean run too
        self.sup = Supervisor(cfg, settings=self.settings, say=say, allow_private_broker=True,
                              extra_env={"SPLITINFER_QUEUE_EXPIRES_S": str(queue_expires_s),
                                         "SPLITINFER_CACHE_DIR": str(self.scratch),
                                         "SPLITINFER_PROFILE_DIR": str(settings.profile_cache())})

    async def __aenter__(self) -> "ClusterRun":
        try:
            await self.sup.start()
        except BrokerError as exc:
            await self.sup.stop()
            raise HarnessError(str(exc)) from None
        except BaseException:
            await self.sup.stop()
            raise
        # the client must talk to the broker the supervisor settled on (maybe a private one)
        self.settings = self.settings.model_copy(update={"broker_url": self.sup.broker_url})
        return self

    async def __aexit__(self, exc_type, *exc) -> None:
        await self.sup.stop()
        await delete_namespace(self.settings.broker_url, self.settings.namespace)  # a scratch namespace
        if exc_type is None and not self.keep_logs:
            shutil.rmtree(self.scratch, ignore_errors=True)
        else:
            self.say(f"actor logs kept in {self.sup.run_dir / 'logs'}")
