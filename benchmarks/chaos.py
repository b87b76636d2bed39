"""Faults on purpose, and what they cost: jobs lost, duplicated, wrong, errors, recovery time, memory.

    python benchmarks/chaos.py [--model SPEC] [--parts 3] [--replicas 2] [--servers 3] [--rate 8] [--duration 12]
                               [--faults kill_server,kill_front_end,...] [--json]

Everything runs on a private RabbitMQ node of its own (own node name, port and data directory: it is stopped and
started again here, never the shared broker), with `splitinfer up`'s supervisor in this process and the model
(default: MobileNetV3Small with weights=None and logits out, so its outputs differ per input) split in `--parts`
parts, each on `--replicas` servers. Each row sends jobs through the Client at `--rate` jobs/s for `--duration` s
and injects its fault a third of the way in:

- `kill_<actor>`: kill -9 of one process of that kind (a model server, the front end, the registry, the model pool,
  the result store, the optimizer, the state pool); the supervisor restarts it;
- `broker_queued`: 20 jobs wait in the jobs queue (the front end frozen with SIGSTOP) while the broker restarts;
- `broker_load`: the broker restarts under load;
- `fuzz`: 600 malformed messages (random bytes, bit-flipped and truncated frames, bad jobs) into the data plane
  and the jobs queue while the load runs;
- `overload`: 2000 jobs as fast as one Client can send them, 2 s deadline each: goodput against the no-fault
  throughput (`baseline`, concurrency 8);
- `large_job`: one batch-100 job; the servers' memory before and after;
- `node_down`: on a three-node cluster of private nodes (jobs and control in quorum queues, every actor given
  every node's URL), the node every actor connected to first is stopped under load; the actors carry on through
  the two survivors.

Per row: jobs sent, ok, errors by code, lost (never answered), duplicated (answered more than once on the wire),
wrong (an answer that is not its own input's: each is compared with the local model's output for that input),
recovery (from the end of the fault to the first good answer of a job sent after it), the actors' memory before
and after. Not run in CI (several minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from splitinfer.actors.supervisor.broker import PrivateBroker, PrivateCluster
from splitinfer.client import Client, subscribe_results
from splitinfer.config import get_settings
from splitinfer.harness import ClusterRun, local_runner, make_split, measure_distributed, percentile
from splitinfer.messages import ErrorResult, InferenceJob, ResultMessage
from splitinfer.messages.frames import TENSORS, encode_frame
from splitinfer.splitter.manifest import Manifest

KILLABLE = ("server", "front_end", "registry", "model_pool", "result_store", "optimizer", "state_pool")
FAULTS = ("baseline", *(f"kill_{k}" for k in KILLABLE), "broker_queued", "broker_load", "fuzz", "overload",
          "large_job", "node_down")
ON_CLUSTER = ("node_down",)  # rows run on a three-node cluster of private nodes (quorum queues) after the others
TOL = 1e-4
POOL_INPUTS = 16     # distinct inputs the jobs cycle through (each answer is checked against its own)
SETTLE_S = 60.0      # after the last job is sent, wait at most this long for the answers
DEADLINE_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logits_model(name: str, out: Path) -> str:
    """A keras.applications model with weights=None and no softmax (random-weight softmax outputs are all ~1/1000,
    which cannot tell one input's answer from another's), saved as .keras."""
    from splitinfer import _tf  # noqa: F401
    import keras

    model = getattr(keras.applications, name)(weights=None, classifier_activation=None, input_shape=(224, 224, 3))
    path = out / f"{name}_logits.keras"
    model.save(path)
    return str(path)


class Chaos:
    def __init__(self, run: ClusterRun, client: Client, broker: PrivateBroker, deployment: str, input_name: str,
                 output_name: str, xs: list[np.ndarray], refs: list[np.ndarray], args):
        self.run, self.client, self.broker = run, client, broker
        self.deployment, self.input_name, self.output_name = deployment, input_name, output_name
        self.xs, self.refs, self.args = xs, refs, args
        self.wire: collections.Counter = collections.Counter()  # answers per job id as they come (no dedupe)
        self.baseline_throughput: float | None = None

    # -- observing
    async def listen(self, ready: asyncio.Event) -> None:
        async for msg in subscribe_results(self.client.id, self.run.settings, ready=ready, dedupe=False):
            if msg.job_id:
                self.wire[msg.job_id] += 1

    def memory_mb(self, kinds: tuple[str, ...] | None = None) -> float:
        total = 0
        for name, actor in self.run.sup.actors.items():
            if actor.running and (kinds is None or name.split(":")[0] in kinds):
                try:
                    total += psutil.Process(actor.pid).memory_info().rss
                except psutil.Error:
                    pass
        return total / 2**20

    def process(self, kind: str):
        name = next(n for n in self.run.sup.actors if n.split(":")[0] == kind)
        return self.run.sup.actors[name]

    # -- load
    async def load(self, duration_s: float, fault, deadline_s: float = DEADLINE_S) -> dict:
        """Jobs at the row's rate for `duration_s`; `fault()` runs a third of the way in and returns when the fault
        is over. Then every job's answer (or the lack of one)."""
        loop = asyncio.get_running_loop()
        jobs: dict[str, tuple[float, int]] = {}    # job id -> (sent at, input index)
        answers: dict[str, tuple[float, object]] = {}
        tasks = []
        fault_over = [None]

        async def one(i: int) -> None:
            job_id = f"chaos-{uuid.uuid4().hex[:12]}"
            jobs[job_id] = (loop.time(), i % len(self.xs))
            try:
                fut = await self.client.submit(self.deployment, {self.input_name: self.xs[i % len(self.xs)]},
                                               deadline_s=deadline_s, job_id=job_id)
                answer = await self.client.wait(fut, timeout=deadline_s + SETTLE_S)
            except Exception as exc:  # not sent, or no answer: counted as lost below unless answered
                answer = ErrorResult(job_id=job_id, code=f"client:{type(exc).__name__}", message=str(exc))
            answers[job_id] = (loop.time(), answer)

        async def inject() -> None:
            await asyncio.sleep(duration_s / 3)
            await fault()
            fault_over[0] = loop.time()

        start = loop.time()
        injector = asyncio.create_task(inject()) if fault else None
        i = 0
        while loop.time() - start < duration_s:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(1 / self.args.rate)
        if injector is not None:
            await injector
        await asyncio.wait(tasks, timeout=deadline_s + SETTLE_S + 5)
        await asyncio.sleep(1.0)  # a late second answer on the wire would arrive now
        return self.tally(jobs, answers, fault_over[0])

    def tally(self, jobs: dict, answers: dict, fault_over: float | None) -> dict:
        ok = wrong = lost = dup = 0
        not_ok: list[str] = []   # the ids of jobs not answered right (to look up in the actors' logs)
        twice: list[str] = []    # ... and of jobs answered more than once on the wire
        errors: collections.Counter = collections.Counter()
        recovery = None
        for job_id, (sent_at, k) in jobs.items():
            if self.wire[job_id] > 1:
                dup += 1
                twice.append(job_id)
            got = answers.get(job_id)
            if got is None or not isinstance(got[1], ResultMessage):
                not_ok.append(job_id)
            if got is None:
                lost += 1
                continue
            at, answer = got
            if isinstance(answer, ResultMessage):
                y = answer.outputs[self.output_name]
                dist = [float(np.max(np.abs(y - r))) for r in self.refs]
                if dist[k] > TOL or int(np.argmin(dist)) != k:
                    wrong += 1
                    continue
                ok += 1
                if fault_over is not None and sent_at >= fault_over:
                    recovery = min(recovery if recovery is not None else 1e9, at - fault_over)
            elif answer.code.startswith("client:"):
                lost += 1
            else:
                errors[answer.code] += 1
        return {"sent": len(jobs), "ok": ok, "errors": dict(errors), "lost": lost, "duplicated": dup,
                "wrong": wrong, "recovery_s": recovery, "not_ok": not_ok[:20], "twice": twice[:20]}

    # -- the faults
    def kill(self, kind: str):
        async def fault() -> None:
            actor = self.process(kind)
            old = actor.pid
            os.kill(old, signal.SIGKILL)
            while not (actor.running and actor.pid != old):  # the supervisor restarts it
                await asyncio.sleep(0.05)
        return fault

    async def restart_broker(self) -> None:
        before = self.client.session.connection.reconnects
        await asyncio.to_thread(self.broker.stop)
        await asyncio.to_thread(self.broker.start)
        while self.client.session.connection.reconnects == before or not self.client.session.connection.is_open:
            await asyncio.sleep(0.05)

    async def node_down(self) -> None:
        await asyncio.to_thread(self.broker.nodes[0].stop)

    async def broker_queued(self) -> dict:
        """20 jobs in the jobs queue, the front end frozen, the broker restarted; then the front end thaws."""
        loop = asyncio.get_running_loop()
        front = self.process("front_end")
        os.kill(front.pid, signal.SIGSTOP)
        jobs, futs = {}, {}
        try:
            for i in range(20):
                job_id = f"queued-{uuid.uuid4().hex[:12]}"
                jobs[job_id] = (loop.time(), i % len(self.xs))
                futs[job_id] = await self.client.submit_job(InferenceJob(
                    job_id=job_id, deployment=self.deployment, reply_to=self.client.id,
                    inputs={self.input_name: self.xs[i % len(self.xs)]}, deadline_s=120))
            await self.restart_broker()
        finally:
            os.kill(front.pid, signal.SIGCONT)
        over = loop.time()
        answers = {}
        for job_id, fut in futs.items():
            try:
                answers[job_id] = (loop.time(), await self.client.wait(fut, timeout=120))
            except TimeoutError:
                pass
        await asyncio.sleep(1.0)
        row = self.tally(jobs, answers, None)
        row["recovery_s"] = max((at for at, _ in answers.values()), default=over) - over
        return row

    async def fuzz(self) -> None:
        rng = np.random.default_rng(0)
        manifest = await self.client.manifest(self.deployment)
        key = self.client.names.tensor_key(self.deployment, manifest.inputs[0].name)
        good = encode_frame(TENSORS, {"rid": "fuzz", "job": "fuzz", "dep": self.deployment, "rt": "fuzz",
                                      "err": "fuzz", "sent": time.time()}, {manifest.inputs[0].name: self.xs[0]})
        pub = self.client.session.publisher
        for k in range(600):
            kind = k % 4
            if kind == 0:
                body = rng.bytes(int(rng.integers(1, 4096)))
            elif kind == 1:
                flipped = bytearray(good)
                for pos in rng.integers(0, min(len(flipped), 256), size=4):
                    flipped[pos] ^= 0xFF
                body = bytes(flipped)
            elif kind == 2:
                body = good[: int(rng.integers(1, len(good)))]
            else:
                body = rng.bytes(64)
            rid = f"fuzz-{k}"
            if kind == 3:
                await pub.publish("", self.client.names.jobs, body, headers={"request_id": rid, "reply_to": rid})
            else:
                await pub.publish("tensors", key, body, headers={"request_id": rid, "reply_to": rid}, mandatory=False)

    async def overload(self) -> dict:
        loop = asyncio.get_running_loop()
        n, deadline_s = 2000, 2.0
        t0 = loop.time()
        futs = {}
        jobs = {}
        for i in range(n):
            job_id = f"burst-{uuid.uuid4().hex[:12]}"
            jobs[job_id] = (loop.time(), i % len(self.xs))
            futs[job_id] = asyncio.create_task(self.client.submit(
                self.deployment, {self.input_name: self.xs[i % len(self.xs)]}, deadline_s=deadline_s, job_id=job_id))
        answers = {}
        for job_id, task in futs.items():
            try:
                answers[job_id] = (loop.time(), await self.client.wait(await task, timeout=deadline_s + SETTLE_S))
            except Exception as exc:
                answers[job_id] = (loop.time(), ErrorResult(job_id=job_id, code=f"client:{type(exc).__name__}",
                                                            message=str(exc)))
        ok_times = [at for at, a in answers.values() if isinstance(a, ResultMessage)]
        row = self.tally(jobs, answers, None)
        span = (max(ok_times) - t0) if ok_times else float("nan")
        row["goodput_per_s"] = len(ok_times) / span if ok_times else 0.0
        if self.baseline_throughput:
            row["goodput_vs_baseline"] = row["goodput_per_s"] / self.baseline_throughput
        return row

    async def large_job(self) -> dict:
        loop = asyncio.get_running_loop()
        servers = ("server",)
        before = self.memory_mb(servers)
        batch = np.concatenate([self.xs[k % len(self.xs)] for k in range(100)])
        t0 = loop.time()
        answer = await self.client.wait(await self.client.submit(self.deployment, {self.input_name: batch},
                                                                 deadline_s=120), timeout=180)
        row = {"sent": 1, "ok": 0, "errors": {}, "lost": 0, "duplicated": 0, "wrong": 0,
               "recovery_s": loop.time() - t0, "not_ok": []}
        if isinstance(answer, ResultMessage):
            y = answer.outputs[self.output_name]
            want = np.concatenate([self.refs[k % len(self.refs)] for k in range(100)])
            row["ok" if float(np.max(np.abs(y - want))) <= TOL else "wrong"] = 1
        else:
            row["errors"] = {answer.code: 1}
        await asyncio.sleep(3.0)
        row["server_memory_before_mb"], row["server_memory_after_mb"] = before, self.memory_mb(servers)
        return row

    async def row(self, fault: str) -> dict:
        before = self.memory_mb()
        if fault == "baseline":
            xs = [self.xs[k % len(self.xs)] for k in range(60)]
            m = await measure_distributed(self.client, self.deployment, xs, self.input_name, 8, DEADLINE_S)
            self.baseline_throughput = m["throughput"]
            row = await self.load(self.args.duration, None)
            row["throughput_per_s"] = m["throughput"]
            row["latency_median_ms"] = percentile(m["latency"], 50) * 1e3
        elif fault.startswith("kill_"):
            row = await self.load(self.args.duration, self.kill(fault[len("kill_"):]))
        elif fault == "broker_queued":
            row = await self.broker_queued()
        elif fault == "broker_load":
            row = await self.load(self.args.duration, self.restart_broker)
        elif fault == "fuzz":
            row = await self.load(self.args.duration, self.fuzz)
        elif fault == "overload":
            row = await self.overload()
        elif fault == "node_down":
            row = await self.load(self.args.duration, self.node_down)
        else:
            row = await self.large_job()
        row.setdefault("memory_before_mb", before)
        row.setdefault("memory_after_mb", self.memory_mb())
        return {"fault": fault, **row}


async def run(args, say) -> dict:
    settings = get_settings()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        tmp = Path(tmp)
        model = logits_model(args.model.split(":")[-1], tmp) if args.model.startswith("keras.applications:") \
            else args.model
        split_dir = tmp / "split"
        make_split(model, args.parts, split_dir)
        manifest = Manifest.load(split_dir)
        input_name, output_name = manifest.inputs[0].name, manifest.output_names[0]
        rng = np.random.default_rng(0)
        xs = [rng.uniform(0, 1, size=(1, 224, 224, 3)).astype(np.float32) for _ in range(POOL_INPUTS)]
        local = local_runner(split_dir)
        refs = [np.asarray(local({input_name: x})[output_name]) for x in xs]
        rows = []
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("faults", total=len(args.faults))

            async def faults_on(broker, kind: str, faults: list[str], queue_type: str) -> None:
                broker.start()
                try:
                    ns = f"splitinfer.chaos{uuid.uuid4().hex[:6]}"
                    cluster_settings = settings.model_copy(update={"namespace": ns, "broker_url": broker.url,
                                                                   "queue_type": queue_type})
                    async with ClusterRun(args.servers, cluster_settings, say) as cluster:
                        cluster.keep_logs = args.keep_logs
                        async with Client(cluster.settings) as client:
                            dep = await client.deploy(split_dir, replicas=args.replicas, min_servers=args.servers)
                            chaos = Chaos(cluster, client, broker, dep.deployment, input_name, output_name, xs,
                                          refs, args)
                            ready = asyncio.Event()
                            listener = asyncio.create_task(chaos.listen(ready))
                            await asyncio.wait_for(ready.wait(), 30)
                            for fault in faults:
                                progress.update(task, description=fault)
                                rows.append({**await chaos.row(fault), "broker": kind})
                                progress.advance(task)
                            listener.cancel()
                finally:
                    broker.stop()

            single = [f for f in args.faults if f not in ON_CLUSTER]
            if single:
                await faults_on(PrivateBroker(free_port(), tmp / "broker", say=lambda m: None), "1 node", single,
                                settings.queue_type)
            on_cluster = [f for f in args.faults if f in ON_CLUSTER]
            if on_cluster:
                await faults_on(PrivateCluster([free_port() for _ in range(3)], tmp / "nodes", say=lambda m: None),
                                "3 nodes, quorum", on_cluster, "quorum")
    return {"model": args.model, "parts": args.parts, "replicas": args.replicas, "servers": args.servers,
            "rate_per_s": args.rate, "duration_s": args.duration, "rows": rows}


def show(report: dict, console: Console) -> None:
    t = Table(title=f"chaos: {report['model'].split(':')[-1]} in {report['parts']} parts x {report['replicas']} "
                    f"replicas, {report['rate_per_s']} jobs/s")
    for col in ("fault", "broker", "sent", "ok", "errors", "lost", "dup", "wrong", "recovery s", "memory MB before/after",
                "note"):
        t.add_column(col, justify="left" if col in ("fault", "broker", "errors", "note") else "right")
    for r in report["rows"]:
        note = ""
        if "goodput_per_s" in r:
            note = f"goodput {r['goodput_per_s']:.1f}/s ({r.get('goodput_vs_baseline', float('nan')):.0%} of no-fault)"
        elif "throughput_per_s" in r:
            note = f"{r['throughput_per_s']:.1f}/s at c=8, median {r['latency_median_ms']:.1f} ms"
        elif "server_memory_after_mb" in r:
            note = f"servers {r['server_memory_before_mb']:.0f} -> {r['server_memory_after_mb']:.0f} MB"
        rec = r.get("recovery_s")
        t.add_row(r["fault"], r.get("broker", "1 node"), str(r["sent"]), str(r["ok"]), ", ".join(f"{k} {v}" for k, v in r["errors"].items())
                  or "-", str(r["lost"]), str(r["duplicated"]), str(r["wrong"]),
                  "-" if rec is None else f"{rec:.2f}", f"{r['memory_before_mb']:.0f} / {r['memory_after_mb']:.0f}",
                  note)
    console.print(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="keras.applications:MobileNetV3Small")
    p.add_argument("--parts", type=int, default=3)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--rate", type=float, default=8.0, help="jobs per second during a row")
    p.add_argument("--duration", type=float, default=12.0, help="seconds of load per row")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of: {', '.join(FAULTS)}")
    p.add_argument("--keep-logs", action="store_true", help="keep the actors' logs (their directory is printed)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown:
        p.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    if "overload" in args.faults and "baseline" in args.faults:  # the goodput is compared with the baseline's
        args.faults.remove("baseline")
        args.faults.insert(0, "baseline")
    console = Console(stderr=args.json, width=200 if not sys.stdout.isatty() else None)
    report = asyncio.run(run(args, lambda m: console.print(m, style="dim", highlight=False)))
    show(report, console)
    if args.json:
        print(json.dumps(report))
    sys.exit(0)


if __name__ == "__main__":
    main()
