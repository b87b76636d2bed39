"""The Python API: run inference on a deployed split model, deploy splits, and plain publish/subscribe helpers.

    async with Client(settings) as c:
        dep = await c.deploy("split_dir", replicas=1)           # upload to the pool, order servers to load parts
        result = await c.infer(dep.deployment, {"input_layer:0": x})   # ResultMessage: outputs, hops, latency
        result = await c.infer(dep.deployment, x)              # a single-input model takes the array alone
        table = await c.deploy_model("keras.applications:MobileNetV3Small", "mnv3s", objective="energy")
        result = await c.infer("mnv3s", x, max_latency_s=0.1, battery=0.2)  # the front end picks a plan
        result.plan                                            # which plan ran

A failed job raises `JobFailed` (its `.error` is the ErrorResult: code, message, where). Jobs go through the
front end (`<ns>.jobs`); answers come back on `<ns>.results` with this client's id as routing key.

For users who wire their own: `publish_job(job)` puts an InferenceJob (or raw bytes) on the jobs queue;
`subscribe_results(key)` yields every ResultMessage / ErrorResult published with that key ("#": all).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import numpy as np

from splitinfer.actors.base import Actor
from splitinfer.actors.topology import Names, escape_key
from splitinfer.messages import (
    ActorInfo,
    DeleteDeployment,
    DeployModel,
    ErrorResult,
    InferenceJob,
    ListDeployments,
    MessageError,
    PartRequest,
    PoolManifest,
    Reply,
    Requirements,
    ResultMessage,
    decode,
    encode,
)
from splitinfer.settings import Settings, get_settings

ANSWER_SLACK_S = 10.0  # past the job's deadline the front end has answered; wait this much longer for the message


def _safe_url(url: str) -> str:
    """The URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class _NullStream:
    def write(self, _: str) -> None:
        pass

    def flush(self) -> None:
        pass


class ClientError(Exception):
    """Something the caller can fix: no servers, unknown part in a placement, pool refused the split..."""


class JobFailed(Exception):
    def __init__(self, error: ErrorResult):
        super().__init__(f"job {error.job_id}: {error.code}: {error.message}")
        self.error = error


@dataclass
class Deployment:
    deployment: str
    placement: dict[str, list[str]]  # part -> server id per replica
    inputs: list[str]
    outputs: list[str]
    load_s: float = 0.0


@dataclass
class _Waiter:
    future: asyncio.Future
    sent_at: float = 0.0


class Client(Actor):
    """A broker actor of kind "client" (registers like any actor, so `status` shows it)."""

    kind = "client"

    def __init__(self, settings: Settings | None = None, client_id: str | None = None, *, verbose: bool = False):
        super().__init__(client_id or f"client-{uuid.uuid4().hex[:10]}", settings)
        if not verbose:  # the actors' JSON log lines are for operators; a library caller gets exceptions instead
            self.log.stream = _NullStream()
        self._waiters: dict[str, _Waiter] = {}
        self._manifests: dict[str, object] = {}
        self._results_queue = None

    async def __aenter__(self) -> "Client":
        await self.start()
        return self

    async def start(self) -> None:
        """Fail fast when no broker answers (the base actor retries for a minute and more: right for a server
        process that the supervisor started before the broker was up, not for a user waiting on a command)."""
        import logging

        quiet = [logging.getLogger(n) for n in ("aiormq", "aio_pika")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:  # a refused probe is the answer we report, not a log line
            lg.setLevel(logging.CRITICAL)
        try:
            probe = await aio_pika.connect(self.settings.broker_url, timeout=5)
        except Exception as exc:
            raise ConnectionError(f"no broker answers at {_safe_url(self.settings.broker_url)} "
                                  f"({type(exc).__name__}); is RabbitMQ running, or is `splitinfer up` using a "
                                  f"private one (set SPLITINFER_BROKER_URL)?") from None
        finally:
            for lg, level in zip(quiet, levels):
                lg.setLevel(level)
        await probe.close()
        await super().start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def setup(self) -> None:
        assert self.channel is not None
        q = await self.channel.declare_queue(f"{self.names.ns}.client.{escape_key(self.id)}", exclusive=True,
                                             auto_delete=True)
        await q.bind(self.exchanges["results"], routing_key=self.names.result_key(self.id))
        await q.consume(self._on_answer, no_ack=True)
        self._results_queue = q

    async def on_stop(self) -> None:
        for w in self._waiters.values():
            if not w.future.done():
                w.future.set_exception(ClientError(f"client {self.id} stopped before the answer came"))
        self._waiters.clear()

    async def _on_answer(self, message) -> None:
        try:
            msg = decode(message.body, max_bytes=self.settings.max_message_bytes, expect=(ResultMessage, ErrorResult))
        except MessageError as exc:
            self.log.warning("bad_answer", error=exc.reason)
            return
        w = self._waiters.pop(msg.job_id or "", None)
        if w is not None and not w.future.done():
            w.future.set_result(msg)

    # ------------------------------------------------------------------ inference
    async def submit(self, deployment: str, inputs: Mapping[str, np.ndarray] | np.ndarray, *,
                     deadline_s: float | None = None, job_id: str | None = None,
                     requirements: Requirements | None = None) -> asyncio.Future:
        """Publish a job; the future resolves to its ResultMessage or ErrorResult. `requirements` (max latency,
        battery level, min fidelity) choose the plan of a model deployment (see deploy_model)."""
        if isinstance(inputs, np.ndarray):
            names = await self.input_names(deployment)
            if len(names) != 1:
                raise ClientError(f"deployment {deployment} takes {len(names)} inputs {names}: pass a dict")
            inputs = {names[0]: inputs}
        job = InferenceJob(deployment=deployment, inputs={k: np.ascontiguousarray(v) for k, v in inputs.items()},
                           deadline_s=deadline_s, reply_to=self.id, requirements=requirements or Requirements(),
                           **({"job_id": job_id} if job_id else {}))
        return await self.submit_job(job)

    async def submit_job(self, job: InferenceJob | bytes, job_id: str | None = None) -> asyncio.Future:
        """Publish a prepared job (or raw bytes, e.g. to test the front end) and return the answer's future."""
        jid = job.job_id if isinstance(job, InferenceJob) else (job_id or uuid.uuid4().hex)
        fut = asyncio.get_running_loop().create_future()
        self._waiters[jid] = _Waiter(fut, asyncio.get_running_loop().time())
        try:
            await self.publish("", self.names.jobs, job, headers={"request_id": jid, "reply_to": self.id})
        except BaseException:
            self._waiters.pop(jid, None)
            raise
        return fut

    async def infer(self, deployment: str, inputs: Mapping[str, np.ndarray] | np.ndarray, *,
                    deadline_s: float | None = None, timeout: float | None = None,
                    max_latency_s: float | None = None, battery: float | None = None,
                    min_fidelity: float | None = None) -> ResultMessage:
        """Run one job and return its ResultMessage (outputs, per-hop timings, latency, the plan that ran);
        JobFailed on an error. max_latency_s / battery / min_fidelity steer a model deployment's plan choice."""
        req = Requirements(max_latency_s=max_latency_s, battery=battery, min_fidelity=min_fidelity)
        fut = await self.submit(deployment, inputs, deadline_s=deadline_s, requirements=req)
        answer = await self.wait(fut, deadline_s, timeout)
        if isinstance(answer, ErrorResult):
            raise JobFailed(answer)
        return answer

    async def wait(self, fut: asyncio.Future, deadline_s: float | None = None, timeout: float | None = None
                   ) -> ResultMessage | ErrorResult:
        limit = timeout if timeout is not None else (deadline_s or self.settings.job_deadline_s) + ANSWER_SLACK_S
        try:
            return await asyncio.wait_for(asyncio.shield(fut), limit)
        except asyncio.TimeoutError:
            for job_id, w in list(self._waiters.items()):
                if w.future is fut:
                    del self._waiters[job_id]
            raise TimeoutError(f"no answer within {limit:.1f}s: is the front end running (`splitinfer up`)?") from None

    async def input_names(self, deployment: str) -> list[str]:
        return [t["name"] for t in (await self.manifest_json(deployment))["inputs"]]

    async def manifest_json(self, deployment: str) -> dict:
        """The deployment's manifest from the model pool as plain JSON (cached). Plain on purpose: the Manifest
        model lives in splitinfer.splitter, whose package import loads TensorFlow, which a client that only
        sends jobs should not pay for."""
        if deployment not in self._manifests:
            listed = deployment
            if deployment in await self.models():  # a model deployment: every plan takes the same inputs
                table = await self.plan_table(deployment)
                from splitinfer.planner.optimize import plan_deployment_name

                listed = plan_deployment_name(deployment, table["plans"][0]["id"])
            elif deployment not in await self.deployments():
                raise ClientError(f"no deployment {deployment!r} in the model pool")
            r = await self.rpc(Names.POOL_REQUEST, PartRequest(deployment=listed, file="manifest.json"))
            if not isinstance(r, PoolManifest):
                raise ClientError(f"the model pool has no manifest for {deployment!r}: {getattr(r, 'message', r)}")
            self._manifests[deployment] = json.loads(r.manifest)
        return self._manifests[deployment]

    # ------------------------------------------------------------------ cluster
    async def servers(self, include_dead: bool = False) -> list[ActorInfo]:
        """Model servers the registry knows (live ones unless include_dead)."""
        return [a for a in await self.actors(include_dead) if a.kind == "model_server"]

    async def actors(self, include_dead: bool = False) -> list[ActorInfo]:
        from splitinfer.actors.registry import who_hosts

        try:
            return list((await who_hosts(self, include_dead=include_dead)).actors)
        except (asyncio.TimeoutError, aio_pika.exceptions.PublishError):  # no registry (yet): its queue is unbound
            raise ClientError("the registry did not answer: is the cluster up (`splitinfer up`)?") from None

    async def deployments(self) -> list[str]:
        return (await self._listing()).get("deployments", [])

    async def models(self) -> list[str]:
        """Model deployments: names with a plan table (deploy_model), each plan a deployment `<name>:<plan>`."""
        return (await self._listing()).get("models", [])

    async def _listing(self) -> dict[str, list[str]]:
        try:
            r = await self.rpc(Names.POOL_REQUEST, ListDeployments(), timeout=min(10.0, self.settings.rpc_timeout_s))
        except (asyncio.TimeoutError, aio_pika.exceptions.PublishError):
            raise ClientError("the model pool did not answer: is the cluster up (`splitinfer up`)?") from None
        return {k: list(v) for k, v in r.data.items()} if isinstance(r, Reply) else {}

    async def plan_table(self, model: str) -> dict:
        """A model deployment's plan table (planner.PlanTable.to_json()): plans with predicted latency, device
        energy, fidelity, throughput, route; `primary` is the objective's best."""
        from splitinfer.actors.model_pool import fetch_plan_table

        doc = await fetch_plan_table(self, model)
        if doc is None:
            raise ClientError(f"no model deployment {model!r} in the model pool")
        return doc["table"]

    async def deploy_model(self, model: str | Path, name: str | None = None, *, objective: str = "latency",
                           sla_s: float | None = None, servers: list[str] | None = None,
                           input_shape: list[int] | None = None, compression: bool = False, max_plans: int = 6,
                           client_site: str | None = None, timeout: float | None = None) -> dict:
        """Ask the optimizer to profile, plan, split and deploy `model` (`keras.applications:NAME` or a .keras file,
        uploaded to the pool first) as `name`; returns its plan table once every plan serves. ClientError names
        what failed (an SLA no plan meets, a server that is not registered, a part that did not load): nothing is
        left half deployed."""
        from splitinfer.actors.model_pool import PoolError, upload_source
        from splitinfer.splitter.build import APPLICATIONS_PREFIX

        origin = str(model)
        if not origin.startswith(APPLICATIONS_PREFIX):
            path = Path(origin)
            if not path.is_file() or path.suffix != ".keras":
                raise ClientError(f"{origin} is not a .keras file (or use keras.applications:NAME)")
            try:
                origin = await upload_source(self, path)
            except (PoolError, asyncio.TimeoutError) as exc:
                raise ClientError(f"could not upload {path} to the model pool: {exc}") from None
        if name is None:
            import re

            base = re.sub(r"[^A-Za-z0-9_-]", "-", Path(origin.split(":")[-1]).stem.lower())[:40].strip("-")
            name = f"{base or 'model'}-{objective}"
        try:
            req = DeployModel(name=name, model=origin, input_shape=list(input_shape) if input_shape else None,
                              objective=objective, sla_s=sla_s, servers=list(servers or []), compression=compression,
                              max_plans=max_plans, client_site=client_site)
        except ValueError as exc:
            raise ClientError(f"bad deploy request: {str(exc).splitlines()[0]}") from None
        r = await self._ask_optimizer(Names.OPTIMIZER_DEPLOY, req, f"deploy of {name}",
                                      timeout or self.settings.deploy_timeout_s + 30)
        self._manifests.pop(name, None)
        return {"name": name, **r.data}

    async def undeploy(self, name: str, timeout: float = 120.0) -> str:
        """Unload every plan of a model deployment and delete it from the pool."""
        r = await self._ask_optimizer(Names.OPTIMIZER_UNDEPLOY, DeleteDeployment(deployment=name),
                                      f"undeploy of {name}", timeout)
        self._manifests.pop(name, None)
        return r.message

    async def _ask_optimizer(self, key: str, msg, what: str, timeout: float) -> Reply:
        """The optimizer's Reply, or ClientError saying why there is none or what failed."""
        try:
            r = await self.rpc(key, msg, timeout=timeout)
        except aio_pika.exceptions.PublishError:
            raise ClientError("no optimizer is running (start the cluster with `splitinfer up`)") from None
        except asyncio.TimeoutError:
            raise ClientError(f"the optimizer did not answer within {timeout:.0f}s") from None
        if not isinstance(r, Reply) or not r.ok:
            raise ClientError(f"{what} failed: {getattr(r, 'message', r)}")
        return r

    async def wait_for_servers(self, n: int, timeout: float = 60.0) -> list[ActorInfo]:
        """Wait until at least n model servers are alive (registered with the registry)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        live: list[ActorInfo] = []
        while True:
            try:
                live = await self.servers()
            except ClientError:
                live = []
            if len(live) >= n:
                return live
            if loop.time() >= end:
                raise ClientError(f"{len(live)} live model server(s) after {timeout:.0f}s, {n} needed")
            await asyncio.sleep(0.3)

    async def deploy(self, split_dir: str | Path, placement: Mapping[str, str | list[str]] | None = None,
                     replicas: int = 1, *, deployment: str | None = None, min_servers: int = 1,
                     timeout: float = 300.0) -> Deployment:
        """Upload a split to the model pool and have servers load its parts; returns when every replica serves.

        placement: {part: server id or [server id per replica]}; without it, parts go round-robin over the live
        servers (replica k of part i on server (i + k) mod n, so replicas of a part land on different servers).
        The deployment is named by the split's id unless `deployment` names it: the same split deployed again onto
        other servers adds replicas to that deployment; give another name for a separate one."""
        from splitinfer.actors.model_pool import PoolError, send_load_orders, upload_split
        from splitinfer.splitter.graph import SplitError
        from splitinfer.splitter.manifest import Manifest

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            manifest = Manifest.load(Path(split_dir))
        except SplitError as exc:
            raise ClientError(str(exc)) from None
        if replicas < 1:
            raise ClientError("replicas must be at least 1")
        live = await self.wait_for_servers(max(1, min_servers), timeout=min(timeout, 60.0))
        ids = [s.actor_id for s in live]
        parts = [p.name for p in manifest.parts]
        if placement is None:
            if replicas > len(ids):
                raise ClientError(f"{replicas} replicas per part need {replicas} live servers; {len(ids)} are live")
            plan = {p: [ids[(i + k) % len(ids)] for k in range(replicas)] for i, p in enumerate(parts)}
        else:
            plan = {p: [s] if isinstance(s, str) else list(s) for p, s in placement.items()}
            unknown = [p for p in plan if p not in parts]
            if unknown:
                raise ClientError(f"placement names part {unknown[0]!r}; the split has {parts}")
            missing = [p for p in parts if p not in plan]
            if missing:
                raise ClientError(f"placement does not place part {missing[0]!r}")
            dead = sorted({s for servers in plan.values() for s in servers if s not in ids})
            if dead:
                raise ClientError(f"placement uses server(s) {dead} that are not live (live: {ids})")
            if any(not servers for servers in plan.values()):
                raise ClientError("every part needs at least one server")
            twice = [p for p, servers in plan.items() if len(set(servers)) != len(servers)]
            if twice:
                raise ClientError(f"placement puts two replicas of {twice[0]!r} on one server")
        try:
            dep = await upload_split(self, Path(split_dir), deployment)
        except PoolError as exc:
            raise ClientError(str(exc)) from None
        except asyncio.TimeoutError:
            raise ClientError("the model pool did not answer the upload: is the cluster up?") from None
        remaining = max(10.0, timeout - (loop.time() - t0))
        answers = await send_load_orders(self, dep, plan, timeout=remaining)
        failed = {k: r.message for k, r in answers.items() if not r.ok}
        if failed:
            (part, server), why = next(iter(failed.items()))
            raise ClientError(f"{len(failed)} load order(s) failed; {part} on {server}: {why}")
        self._manifests[dep] = json.loads(manifest.model_dump_json())
        return Deployment(dep, plan, [t.name for t in manifest.inputs], manifest.output_names,
                          load_s=loop.time() - t0)

    async def set_links(self, links: Mapping[str, object], *, emulate: bool | None = True, default=None,
                        replace: bool = True) -> None:
        """Change the emulated links of every running actor (SetLinks on `<ns>.control`, key `links.set`).
        links: {"siteA-siteB": LinkSpec | (rtt seconds, bandwidth bytes/s or None)}; `emulate` turns emulation
        on/off (None: leave it). Takes effect for tensors received after the order arrives."""
        from splitinfer.messages import LinkSpec, SetLinks
        from splitinfer.monitor.links import MBIT

        def spec(v) -> LinkSpec:
            if isinstance(v, LinkSpec):
                return v
            rtt, bw = v
            return LinkSpec(rtt_ms=float(rtt) * 1e3, bandwidth_mbps=None if bw is None else float(bw) / MBIT)

        msg = SetLinks(links={k: spec(v) for k, v in links.items()}, emulate=emulate, replace=replace,
                       default=None if default is None else spec(default))
        await self.publish("control", Names.LINKS_SET, msg, mandatory=False)

    async def cluster_state(self, include_dead: bool = False):
        """The state pool's ClusterState: every actor's latest monitor state and every measured link."""
        from splitinfer.actors.state_pool import get_state

        try:
            return await get_state(self, include_dead, timeout=min(10.0, self.settings.rpc_timeout_s))
        except (asyncio.TimeoutError, aio_pika.exceptions.PublishError):
            raise ClientError("the state pool did not answer: is the cluster up (`splitinfer up`)?") from None

    async def queue_depths(self, queues: list[str]) -> dict[str, int | None]:
        """Messages ready in each named queue (None: no such queue). Uses a throwaway channel: a passive declare
        of a missing queue closes its channel."""
        assert self.connection is not None
        out: dict[str, int | None] = {}
        for name in queues:
            ch = await self.connection.channel()
            try:
                q = await ch.declare_queue(name, passive=True)
                out[name] = int(q.declaration_result.message_count or 0)
            except Exception:
                out[name] = None
            finally:
                if not ch.is_closed:
                    await ch.close()
        return out


# --------------------------------------------------------------------------------------------- plain helpers

async def publish_job(job: InferenceJob | bytes, settings: Settings | None = None, *,
                      channel: aio_pika.abc.AbstractChannel | None = None, job_id: str | None = None,
                      reply_to: str | None = None) -> str:
    """Put one job on `<ns>.jobs` (publisher-confirmed). Returns the job id. Answers go to `<ns>.results` with key
    job.reply_to (default: the job id): see subscribe_results."""
    settings = settings or get_settings()
    names = Names(settings.namespace)
    jid = job.job_id if isinstance(job, InferenceJob) else (job_id or uuid.uuid4().hex)
    reply = (job.reply_to if isinstance(job, InferenceJob) else None) or reply_to or jid
    body = job if isinstance(job, (bytes, bytearray)) else encode(job)
    conn = None
    if channel is None:
        conn = await aio_pika.connect(settings.broker_url)
        channel = await conn.channel(publisher_confirms=True)
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(bytes(body), headers={"request_id": jid, "reply_to": reply}),
            routing_key=names.jobs, mandatory=True)
    finally:
        if conn is not None:
            await conn.close()
    return jid


async def subscribe_results(key: str = "#", settings: Settings | None = None, *,
                            ready: asyncio.Event | None = None) -> AsyncIterator[ResultMessage | ErrorResult]:
    """Yield every ResultMessage / ErrorResult published on `<ns>.results` with routing key `key` (a job id or a
    reply_to; "#" for all) from the moment of subscribing. `ready` is set once the queue is bound."""
    settings = settings or get_settings()
    names = Names(settings.namespace)
    conn = await aio_pika.connect(settings.broker_url)
    try:
        ch = await conn.channel()
        ex = await ch.declare_exchange(names.results, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(exclusive=True, auto_delete=True)
        await q.bind(ex, routing_key=key if key == "#" else names.result_key(key))
        if ready is not None:
            ready.set()
        async with q.iterator() as it:
            async for message in it:
                async with message.process():
                    try:
                        msg = decode(message.body, max_bytes=settings.max_message_bytes,
                                     expect=(ResultMessage, ErrorResult))
                    except MessageError:
                        continue
                    yield msg
    finally:
        await conn.close()


__all__ = ["Client", "ClientError", "Deployment", "JobFailed", "publish_job", "subscribe_results"]
