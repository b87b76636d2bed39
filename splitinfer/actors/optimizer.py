"""Optimizer (divider + planner + deployer): turns a deploy request into a plan table whose plans serve.

`DeployModel` on control key `optimizer.deploy` (RPC, one deploy at a time):
1. reads the registry (live model servers, the front end's site) and the state pool (speeds, loads, batteries,
   power figures, measured links); a requested server that is not registered and alive is an error;
2. loads the model (`keras.applications:NAME`, or `pool:<sha256>` uploaded to the model pool's sources), profiles
   it on this machine (cached: splitinfer.monitor.profile_model) and, when asked, measures what compressing each
   cut costs in fidelity (splitinfer.monitor.measure_compression, cached);
3. plans (splitinfer.planner.plan_deployment): the plan table for the objective, every plan within the SLA, or a
   one-line error naming the best latency on offer: nothing has been stored or loaded at that point;
4. splits the model once per plan, uploads each plan as deployment `<name>:<plan>` to the model pool, orders the
   servers to load the parts; if any load fails, every part loaded so far is unloaded, the pool entries are
   deleted and the error names the failure: never half deployed;
5. stores the table in the pool (`<name>/plans.json`, with its cost graph) and pushes it on `plans.<name>`, where
   front ends pick it up. The answer is a Reply whose data holds the table.

Afterwards, every settings.replan_interval_s, it re-predicts the plans of every model deployment from the live
state (planner.repredict: speeds, loads, links) and pushes the table again, so per-job plan choice in the front
end uses current figures. `DeleteDeployment` on `optimizer.undeploy` unloads a model's plans and deletes them.

    python -m splitinfer.actors.optimizer [--id optimizer]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.base import Actor, run_actor
from splitinfer.actors.model_pool import (
    PoolError,
    delete_deployment,
    fetch_plan_table,
    fetch_source,
    send_load_orders,
    send_unload_orders,
    upload_split,
)
from splitinfer.actors.registry import who_hosts
from splitinfer.actors.state_pool import get_state
from splitinfer.actors.topology import Names, declare_control_queue, delete_namespace_part
from splitinfer.messages import (
    ActorInfo,
    ClusterState,
    DeleteDeployment,
    DeployModel,
    ListDeployments,
    MessageError,
    PlanTableMessage,
    Reply,
)
from splitinfer.planner import (
    BrokerOverhead,
    CostGraph,
    LinkFigures,
    PlanError,
    PlanTable,
    PowerProfile,
    ServerDesc,
    build_cluster,
    combine_links,
    plan_deployment,
    plan_deployment_name,
    repredict,
)
from splitinfer.settings import Settings

MAX_LOAD = 0.9  # a server's load as the planner sees it: its CPU share, capped (a busy server still gets a price)


class DeployError(RuntimeError):
    """A deploy that cannot go on; the message says why in one line (the caller sees it as the RPC's answer)."""


class Optimizer(Actor):
    kind = "optimizer"

    def __init__(self, actor_id: str = "optimizer", settings: Settings | None = None):
        super().__init__(actor_id, settings)
        self._lock = asyncio.Lock()
        self.models: dict[str, tuple[PlanTable, CostGraph, dict]] = {}  # name -> table, cost graph, plans.json doc
        self.reference_gflops: float | None = None

    async def setup(self) -> None:
        from splitinfer.actors.model_server import _configure_tf

        _configure_tf(self.settings)  # profile the way servers run: settings.intra_op_threads
        q = await declare_control_queue(self.channel, self.names, self.names.optimizer_queue,
                                        [Names.OPTIMIZER_DEPLOY, Names.OPTIMIZER_UNDEPLOY],
                                        expires_s=self.settings.queue_expires_s)
        await self.consume(q, self._on_message)
        from splitinfer.monitor.runtime import cached_speed_gflops

        self.reference_gflops = await self.run_in_worker(cached_speed_gflops, self.settings.cache_dir)
        self.spawn(self._replan_loop(), name="replan")

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            msg = self.decode(message, expect=(DeployModel, DeleteDeployment))
        except MessageError as err:
            await self.reply(message, Reply(ok=False, message=err.reason))
            await self.dead_letter(message, err)
            return
        # a deploy takes a while (profile, split, load): answer it from a task, keep consuming and heartbeating;
        # acked now, so a crash mid-deploy is not replayed half-way by a redelivery (the caller's wait times out)
        await self.ack(message)
        self.spawn(self._serve(message, msg), name=msg.TYPE)

    async def _serve(self, message: AbstractIncomingMessage, msg) -> None:
        async with self._lock:
            t0 = time.monotonic()
            try:
                if isinstance(msg, DeployModel):
                    answer = await self.deploy(msg)
                else:
                    answer = await self.undeploy(msg.deployment)
            except (PlanError, DeployError, PoolError) as exc:
                answer = Reply(ok=False, message=str(exc))
            except Exception as exc:  # a bug or an unexpected model: one line back, the actor keeps serving
                first = str(exc).splitlines()[0] if str(exc) else ""
                answer = Reply(ok=False, message=f"{type(exc).__name__}: {first}")
                self.log.error("deploy_failed", error=answer.message)
            self.log("answered", request=msg.TYPE, ok=answer.ok, message=answer.message[:300],
                     seconds=round(time.monotonic() - t0, 2))
        await self.reply(message, answer)

    # ------------------------------------------------------------------ deploy
    async def deploy(self, req: DeployModel) -> Reply:
        t0 = time.monotonic()
        timings: dict[str, float] = {}

        def lap(what: str) -> None:
            timings[what] = round(time.monotonic() - t0 - sum(timings.values()), 3)

        listing = await self.rpc(Names.POOL_REQUEST, ListDeployments(), timeout=self.settings.rpc_timeout_s)
        taken = set(listing.data.get("deployments", [])) | set(listing.data.get("models", []))
        if req.name in taken or any(d.startswith(plan_deployment_name(req.name, "")) for d in taken):
            raise DeployError(f"{req.name!r} is already deployed: undeploy it first (`splitinfer undeploy {req.name}`)"
                              f" or choose another --name")
        servers, client_site, state = await self.cluster_view(req.servers)
        if req.client_site is not None:
            client_site = req.client_site
        lap("cluster")
        graph = await self.load_model(req)
        lap("load")
        from splitinfer.monitor import profile_model
        from splitinfer.planner import cost_graph_from_profile

        profile = await self.run_in_worker(lambda: profile_model(graph, cache_dir=self.settings.profile_cache()))
        cost_graph = cost_graph_from_profile(graph, profile)
        lap("profile")
        compression = None
        if req.compression:
            from splitinfer.monitor import measure_compression

            measured = await self.run_in_worker(
                lambda: measure_compression(graph, cache_dir=self.settings.profile_cache()))
            compression = measured.fidelity_table()
            lap("fidelity")
        cluster = self.make_cluster(servers, client_site, state)
        table = plan_deployment(cost_graph, cluster, req.objective, sla=req.sla_s, compression=compression,
                                max_plans=req.max_plans, name=req.name)
        lap("plan")
        self.log("planned", name=req.name, objective=req.objective, client=cluster.client,
                 plans=[f"{p.id}: {p.describe()} {p.latency * 1e3:.1f} ms" for p in table.plans])
        deployed: list[tuple[str, dict[str, list[str]]]] = []
        try:
            await self._deploy_plans(graph, req, table, deployed)
            lap("split_upload_load")
            doc = {"table": table.to_json(), "cost_graph": cost_graph.to_json(), "origin": req.model,
                   "input_shape": req.input_shape, "deployed_at": time.time()}
            r = await self.rpc(Names.POOL_UPLOAD, PlanTableMessage(name=req.name, table=json.dumps(doc)),
                               timeout=self.settings.rpc_timeout_s)
            if not isinstance(r, Reply) or not r.ok:
                raise DeployError(f"the model pool refused the plan table: {getattr(r, 'message', r)}")
        except BaseException:
            await self._roll_back(req.name, deployed)
            raise
        self.models[req.name] = (table, cost_graph, doc)
        await self._push(req.name)
        return Reply(ok=True, message=f"{req.name}: {len(table.plans)} plan(s) serving, primary {table.primary}",
                     data={"table": table.to_json(), "timings_s": timings,
                           "deployments": {p.id: plan_deployment_name(req.name, p.id) for p in table.plans}})

    async def _deploy_plans(self, graph, req: DeployModel, table: PlanTable,
                            deployed: list[tuple[str, dict[str, list[str]]]]) -> None:
        """Split, upload and load every plan; `deployed` lists what went out (for a roll-back)."""
        from splitinfer.splitter import save_split, split_by_groups
        from splitinfer.splitter.manifest import Manifest

        deadline = time.monotonic() + self.settings.deploy_timeout_s
        with tempfile.TemporaryDirectory(prefix="splitinfer-opt-") as tmp:
            for plan in table.plans:
                dep = plan_deployment_name(req.name, plan.id)
                out = Path(tmp) / plan.id
                where = plan.assignment()

                def split_plan():
                    specs = split_by_groups(graph, plan.groups())
                    manifest = save_split(graph, specs, out, origin=req.model)
                    for part in manifest.parts:  # the cut tensors the plan sends compressed
                        for o in part.outputs:
                            o.codec = plan.compression.get(o.name)
                    manifest.save(out)
                    return manifest

                manifest: Manifest = await self.run_in_worker(split_plan)
                placement = {p.name: [where[p.operations[0]]] for p in manifest.parts}
                deployed.append((dep, {}))
                await upload_split(self, out, dep)
                deployed[-1] = (dep, placement)
                remaining = max(10.0, deadline - time.monotonic())
                answers = await send_load_orders(self, dep, placement, timeout=remaining)
                failed = {k: r.message for k, r in answers.items() if not r.ok}
                if failed:
                    (part, server), why = next(iter(failed.items()))
                    raise DeployError(f"plan {plan.id}: {part} did not load on {server}: {why}")

    async def _roll_back(self, name: str, deployed: list[tuple[str, dict[str, list[str]]]]) -> None:
        """Unload what was loaded, delete what was stored: a failed deploy leaves nothing behind."""
        for dep, placement in deployed:
            if placement:
                await send_unload_orders(self, dep, placement)
                await self._delete_queues(dep, placement)
            await delete_deployment(self, dep)
        await delete_deployment(self, name)
        self.log.warning("rolled_back", name=name, deployments=[d for d, _ in deployed])

    async def _delete_queues(self, dep: str, placement: dict[str, list[str]]) -> None:
        try:
            channel = await self.connection.channel()
            for part, servers in placement.items():
                await delete_namespace_part(channel, self.names, dep, part, len(servers))
            await channel.close()
        except Exception as exc:  # queues also expire or stay harmless: nothing routes to a deleted deployment
            self.log.warning("queue_cleanup_failed", deployment=dep, error=f"{type(exc).__name__}: {exc}")

    async def undeploy(self, name: str) -> Reply:
        doc = await fetch_plan_table(self, name)
        if doc is None:
            raise DeployError(f"no model deployment {name!r} (a plain split is removed with the pool, not here)")
        table = PlanTable.from_json(doc["table"])
        for plan in table.plans:
            dep = plan_deployment_name(name, plan.id)
            hosts = await who_hosts(self, deployment=dep, include_dead=True)
            placement: dict[str, list[str]] = {}
            for a in hosts.actors:
                for ref in a.parts:
                    if ref.deployment == dep:
                        placement.setdefault(ref.part, []).append(a.actor_id)
            if placement:
                await send_unload_orders(self, dep, placement)
                await self._delete_queues(dep, placement)
        r = await delete_deployment(self, name)
        self.models.pop(name, None)
        # front ends forget the table (an empty document means "gone")
        await self.publish("control", Names.plans_key(name), PlanTableMessage(name=name, table="{}"), mandatory=False)
        return Reply(ok=r.ok, message=f"{name} undeployed ({len(table.plans)} plans)" if r.ok else r.message)

    # ------------------------------------------------------------------ what the planner sees
    async def cluster_view(self, wanted: list[str]) -> tuple[list[ActorInfo], str, ClusterState | None]:
        """Live model servers (only `wanted` ones when given), the front end's site, the state pool's state."""
        hosts = await who_hosts(self)
        live = [a for a in hosts.actors if a.kind == "model_server" and a.alive]
        if wanted:
            ids = {a.actor_id for a in live}
            unknown = [s for s in wanted if s not in ids]
            if unknown:
                raise DeployError(f"server {unknown[0]!r} is not registered (live model servers: "
                                  f"{', '.join(sorted(ids)) or 'none'})")
            live = [a for a in live if a.actor_id in set(wanted)]
        if not live:
            raise DeployError("no live model server to deploy on: start some (`splitinfer up --servers N`)")
        front = [a.site for a in hosts.actors if a.kind == "front_end" and a.alive]
        state = None
        try:
            state = await get_state(self, timeout=min(5.0, self.settings.rpc_timeout_s))
        except Exception as exc:  # the registry's heartbeat states still give speeds; links fall back to settings
            self.log.warning("no_state_pool", error=f"{type(exc).__name__}: {exc}")
        return live, (front[0] if front else ""), state

    def make_cluster(self, servers: list[ActorInfo], client_site: str, state: ClusterState | None):
        fresh = {a.actor_id: a.state for a in (state.servers() if state else [])}
        descs = []
        for a in servers:
            st = fresh.get(a.actor_id, a.state)
            speed = 1.0
            if st.speed_gflops and self.reference_gflops:
                speed = st.speed_gflops / self.reference_gflops
            speed /= max(1.0, st.slowdown)
            load = min(MAX_LOAD, (st.cpu_percent or 0.0) / 100.0)
            memory = int(st.memory_limit_mb * 1e6) if st.memory_limit_mb else None
            power = PowerProfile(**st.power.model_dump()) if st.power else None
            descs.append(ServerDesc(a.actor_id, a.site, speed=speed, load=load, memory=memory, power=power))
        broker = BrokerOverhead(per_message=self.settings.broker_per_message_ms / 1e3,
                                per_byte=self.settings.broker_per_mb_ms / 1e3 / 1e6)
        measured = [(x.src_site, x.dst_site, LinkFigures(x.rtt_ms / 1e3, None if x.bandwidth_mbps is None
                                                         else x.bandwidth_mbps * 1e6 / 8))
                    for x in (state.links if state else [])]
        configured = {}
        if self.settings.emulate_links:  # the emulated links are the network; without emulation nothing is slow
            from splitinfer.monitor.links import split_pair

            for key, spec in self.settings.links.items():
                configured[split_pair(key)] = LinkFigures(spec.rtt_ms / 1e3, None if spec.bandwidth_mbps is None
                                                          else spec.bandwidth_mbps * 1e6 / 8)
        d = self.settings.default_link
        default = LinkFigures(d.rtt_ms / 1e3, None if d.bandwidth_mbps is None else d.bandwidth_mbps * 1e6 / 8) \
            if self.settings.emulate_links else None
        sites = {s.site for s in descs} | {client_site}
        links = combine_links(measured, configured, default, sites, broker)
        return build_cluster(descs, client_site, links=links, broker=broker)

    async def load_model(self, req: DeployModel):
        from splitinfer.splitter import ModelGraph, SplitError, load_source_model

        origin = req.model
        try:
            if origin.startswith("pool:"):
                path = await fetch_source(self, origin, self.settings.cache_dir / "sources")
                origin = str(path)
            shape = tuple(req.input_shape) if req.input_shape else None
            return await self.run_in_worker(lambda: ModelGraph(load_source_model(origin, shape)))
        except (SplitError, MessageError) as exc:
            raise DeployError(str(exc)) from None

    # ------------------------------------------------------------------ live re-prediction
    async def _push(self, name: str) -> None:
        table, _, doc = self.models[name]
        doc = {**doc, "table": table.to_json()}
        self.models[name] = (table, self.models[name][1], doc)
        await self.publish("control", Names.plans_key(name), PlanTableMessage(name=name, table=json.dumps(doc)),
                           mandatory=False)

    async def _replan_loop(self) -> None:
        await asyncio.sleep(min(self.settings.replan_interval_s or 1.0, 5.0))
        await self._adopt_pool_models()
        while not self.stopping and self.settings.replan_interval_s > 0:
            await asyncio.sleep(self.settings.replan_interval_s)
            if self._lock.locked():
                continue
            try:
                await self.replan()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("replan_failed", error=f"{type(exc).__name__}: {exc}")

    async def _adopt_pool_models(self) -> None:
        """After a restart: the model deployments already in the pool are re-predicted too."""
        try:
            listing = await self.rpc(Names.POOL_REQUEST, ListDeployments(), timeout=self.settings.rpc_timeout_s)
            for name in listing.data.get("models", []):
                if name not in self.models:
                    doc = await fetch_plan_table(self, name)
                    if doc is not None:
                        self.models[name] = (PlanTable.from_json(doc["table"]), CostGraph.from_json(doc["cost_graph"]),
                                             doc)
        except Exception as exc:
            self.log.warning("adopt_failed", error=f"{type(exc).__name__}: {exc}")

    async def replan(self) -> None:
        if not self.models:
            return
        hosts = await who_hosts(self)
        live = [a for a in hosts.actors if a.kind == "model_server" and a.alive]
        if not live:
            return
        front = [a.site for a in hosts.actors if a.kind == "front_end" and a.alive]
        try:
            state = await get_state(self, timeout=min(5.0, self.settings.rpc_timeout_s))
        except Exception:
            state = None
        for name, (table, cost_graph, _) in list(self.models.items()):
            cluster = self.make_cluster(live, front[0] if front else "", state)
            if cluster.client != table.client:  # the device is down: keep the deploy-time figures
                continue
            if repredict(table, cost_graph, cluster):
                await self._push(name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splitinfer.actors.optimizer", description=__doc__.splitlines()[0])
    ap.add_argument("--id", default="optimizer")
    args = ap.parse_args(argv)
    run_actor(Optimizer(args.id))


if __name__ == "__main__":
    main()
