"""The optimizer actor (divider + planner + deployer): turns a deploy request into a plan table whose plans serve.

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
   front ends pick it up. The answer is a DeployReply with the table.

Afterwards, every settings.replan_interval_s, it re-predicts the plans of every model deployment from the live
state (planner.repredict: speeds, loads, links) and pushes the table again, so per-job plan choice in the front
end uses current figures. With settings.learn_costs the state includes what the answers measured
(the front ends' hop reports, planner.learning): servers' compute factors and the per-hop overhead that make
predictions meet measured latencies, logged with the prediction error before and after (`costs_learned`).
With settings.adaptive_replanning it also plans again on that state
(planner.adaptive): a plan that beats every deployed one by the threshold, checks in a row, is split, uploaded
and loaded as `<name>:r<revision>` (all or nothing), joins the table as its primary and is pushed, so jobs switch
to it; plans no request would get for a while leave the table and, once jobs in flight have had their deadline,
their servers. Each change is logged (`replanned`, `retired`) with the predictions before and after.
`UndeployModel` on `optimizer.undeploy` unloads a model's plans and deletes them.

    python -m splitinfer.actors.optimizer [--id optimizer]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.actor import Actor, run_actor
from splitinfer.actors.model_pool.client import PoolClient, PoolError
from splitinfer.actors.model_server.client import ServerOrders, failures
from splitinfer.actors.model_server.runner import configure_tf
from splitinfer.actors.registry.client import RegistryClient
from splitinfer.actors.state_pool.client import StatePoolClient
from splitinfer.actors.transport import first_line
from splitinfer.actors.transport.topology import Names, declare_control_queue, delete_namespace_part
from splitinfer.config import Settings
from splitinfer.messages import (
    ActorInfo,
    ClusterState,
    DeployModel,
    DeployReply,
    Message,
    MessageError,
    PlanTableMessage,
    Reply,
    UndeployModel,
    plan_deployment_name,
)
from splitinfer.monitor import measure_compression, profile_model
from splitinfer.monitor.fidelity import same_interface, variant_fidelity
from splitinfer.monitor.runtime import speed_gflops
from splitinfer.planner import (
    BrokerOverhead,
    Cluster,
    CostGraph,
    PlanError,
    PlanTable,
    PowerProfile,
    ServerDesc,
    cluster_from,
    cost_graph_from_profile,
    plan_deployment,
    repredict,
)
from splitinfer.planner.adaptive import Improvement, ReplanPolicy, Replanner, better_plan
from splitinfer.planner.learning import StableSince, learn
from splitinfer.planner.plan import Plan
from splitinfer.planner.table import keep_primary_current, variant_table
from splitinfer.splitter import ModelGraph, SplitError, load_source_model, save_split_on_runtimes, split_by_groups
from splitinfer.splitter.manifest import Manifest

REFERENCE_VARIANT = "reference"  # the deploy's own model, when the table spans variants
MAX_LOAD = 0.9  # a server's load as the planner sees it: its CPU share, capped (a busy server still gets a price)


class DeployError(RuntimeError):
    """A deploy that cannot go on; the message says why in one line (the caller sees it as the RPC's answer)."""


class Optimizer(Actor):
    kind = "optimizer"

    def __init__(self, actor_id: str = "optimizer", settings: Settings | None = None):
        super().__init__(actor_id, settings)
        self.pool = PoolClient(self.rpc, self.settings.pool_chunk_bytes)
        self.registry = RegistryClient(self.rpc)
        self.state_pool = StatePoolClient(self.rpc)
        self.orders = ServerOrders(self.rpc, self.names)
        self._lock = asyncio.Lock()
        self.models: dict[str, tuple[PlanTable, CostGraph, PlanTableMessage]] = {}
        self.sources: dict[str, ModelGraph] = {}  # each model deployment's source graph, to split new plans from
        self.replanners: dict[str, Replanner] = {}
        self._stable: dict[str, StableSince] = {}  # model -> since when each plan's prediction holds
        self._variant_cost_graphs: dict[str, dict[str, CostGraph]] = {}
        self.reference_gflops: float | None = None
        st = self.settings
        self.policy = ReplanPolicy(threshold=st.replan_threshold, hold=st.replan_hold, cooldown_s=st.replan_cooldown_s,
                                   max_plans=st.replan_max_plans, retire_after_s=st.replan_retire_after_s)

    async def setup(self) -> None:
        configure_tf(self.settings)  # profile the way servers run: settings.intra_op_threads
        q = await declare_control_queue(self.channel, self.names, self.names.optimizer_queue,
                                        [Names.OPTIMIZER_DEPLOY, Names.OPTIMIZER_UNDEPLOY], self.connection.policy)
        await self.consume(q, self._on_message)
        self.reference_gflops = await self.run_in_worker(speed_gflops, self.settings.profile_cache(),
                                                         self.settings.calibrate_at_start)
        self.spawn(self._replan_loop(), name="replan")

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            msg = self.decode(message, expect=(DeployModel, UndeployModel))
        except MessageError as err:
            await self.rpc.reply(message, Reply(ok=False, message=err.reason))
            await self.dead_letter(message, err)
            return
        # a deploy takes a while (profile, split, load): answer it from a task, keep consuming and heartbeating;
        # acked now, so a crash mid-deploy is not replayed half-way by a redelivery (the caller's wait times out)
        await self.deliveries.ack(message)
        self.spawn(self._serve(message, msg), name=msg.TYPE)

    async def _serve(self, message: AbstractIncomingMessage, msg: DeployModel | UndeployModel) -> None:
        async with self._lock:
            t0 = time.monotonic()
            answer: Message
            try:
                answer = await (self.deploy(msg) if isinstance(msg, DeployModel) else self.undeploy(msg.name))
            except (PlanError, DeployError, PoolError) as exc:
                answer = Reply(ok=False, message=str(exc))
            except Exception as exc:  # a bug or an unexpected model: one line back, the actor keeps serving
                answer = Reply(ok=False, message=first_line(exc))
                self.log.error("deploy_failed", error=answer.message)
            self.log("answered", request=msg.TYPE, ok=not isinstance(answer, Reply) or answer.ok,
                     message=answer.message[:300], seconds=round(time.monotonic() - t0, 2))
        await self.rpc.reply(message, answer)

    # ------------------------------------------------------------------ deploy
    async def deploy(self, req: DeployModel) -> DeployReply:
        t0 = time.monotonic()
        timings: dict[str, float] = {}

        def lap(what: str) -> None:
            timings[what] = round(time.monotonic() - t0 - sum(timings.values()), 3)

        listing = await self.pool.listing()
        taken = set(listing.deployments) | set(listing.models)
        if req.name in taken or any(d.startswith(plan_deployment_name(req.name, "")) for d in taken):
            raise DeployError(f"{req.name!r} is already deployed: undeploy it first (`splitinfer undeploy {req.name}`)"
                              f" or choose another --name")
        servers, client_site, state = await self.cluster_view(req.servers)
        if req.client_site is not None:
            client_site = req.client_site
        lap("cluster")
        graph = await self.load_model(req.model, req.input_shape)
        lap("load")
        cluster = self.make_cluster(servers, client_site, state)
        cost_graph, table = await self._plan_model(graph, req, cluster)
        lap("plan")
        graphs = {"": (graph, req.model, cost_graph)}  # variant -> (model graph, origin, cost graph)
        if req.variants:
            table, graphs = await self._plan_variants(req, cluster, graph, cost_graph, table)
            lap("variants")
        self.log("planned", name=req.name, objective=req.objective, client=cluster.client,
                 plans=[f"{p.id}: {p.describe()} {p.latency * 1e3:.1f} ms" for p in table.plans])
        deployed: list[tuple[str, dict[str, list[str]]]] = []
        try:
            for variant, (g, origin, _) in graphs.items():
                await self._deploy_plans(g, req.name, origin, [p for p in table.plans if p.variant == variant],
                                         deployed)
            lap("split_upload_load")
            doc = PlanTableMessage(name=req.name, table=table.to_json(), cost_graph=cost_graph.to_json(),
                                   origin=req.model, input_shape=req.input_shape, servers=req.servers,
                                   client_site=req.client_site, deployed_at=time.time(), variants=req.variants,
                                   variant_graphs={v: cg.to_json() for v, (_, _, cg) in graphs.items() if v})
            await self.pool.store_plan_table(doc)
        except BaseException:
            await self._roll_back(req.name, deployed)
            raise
        self.models[req.name] = (table, cost_graph, doc)
        self.sources[req.name] = graph
        self.replanners.pop(req.name, None)
        self._variant_cost_graphs.pop(req.name, None)
        await self._push(req.name)
        return DeployReply(name=req.name, message=f"{req.name}: {len(table.plans)} plan(s) serving, primary "
                                                  f"{table.primary}",
                           table=table.to_json(), timings_s=timings,
                           deployments={p.id: plan_deployment_name(req.name, p.id) for p in table.plans})

    async def _plan_model(self, graph: ModelGraph, req: DeployModel, cluster: Cluster) -> tuple[CostGraph, PlanTable]:
        """Profile one model (cached), measure its compression fidelity when asked, plan its table."""
        profile = await self.run_in_worker(lambda: profile_model(graph, cache_dir=self.settings.profile_cache()))
        try:
            cost_graph = cost_graph_from_profile(graph, profile).keep_on_device(req.keep_on_device)
        except PlanError as exc:
            raise DeployError(str(exc)) from None
        compression = None
        if req.compression:
            measured = await self.run_in_worker(
                lambda: measure_compression(graph, cache_dir=self.settings.profile_cache()))
            compression = measured.fidelity_table()
        table = plan_deployment(cost_graph, cluster, req.objective, sla=req.sla_s, compression=compression,
                                max_plans=req.max_plans, name=req.name)
        return cost_graph, table

    async def _plan_variants(self, req: DeployModel, cluster: Cluster, graph: ModelGraph, cost_graph: CostGraph,
                             table: PlanTable) -> tuple[PlanTable, dict[str, tuple[ModelGraph, str, CostGraph]]]:
        """Plan every variant and merge the tables (planner.variant_table). A variant's accuracy is the user's
        figure, else its measured fidelity to the reference times the reference's accuracy."""
        reference = req.accuracy if req.accuracy is not None else 1.0
        tables = [(REFERENCE_VARIANT, reference, table)]
        graphs = {REFERENCE_VARIANT: (graph, req.model, cost_graph)}
        for v in req.variants:
            if v.name == REFERENCE_VARIANT or v.name in graphs:
                raise DeployError(f"variant name {v.name!r} is taken: give each variant its own name")
            g = await self.load_model(v.model, v.input_shape or req.input_shape)
            problem = same_interface(graph, g)
            if problem:
                raise DeployError(f"variant {v.name}: {problem}")
            accuracy = v.accuracy
            if accuracy is None:
                accuracy = reference * await self.run_in_worker(variant_fidelity, graph, g)
            cg, t = await self._plan_model(g, req, cluster)
            tables.append((v.name, accuracy, t))
            graphs[v.name] = (g, v.model, cg)
            self.log("variant_planned", name=req.name, variant=v.name, accuracy=round(accuracy, 4),
                     fastest_ms=round(min(p.latency for p in t.plans) * 1e3, 2))
        return variant_table(tables), graphs

    async def _deploy_plans(self, graph: ModelGraph, name: str, origin: str, plans: list[Plan],
                            deployed: list[tuple[str, dict[str, list[str]]]]) -> None:
        """Split, upload and load every plan; `deployed` lists what went out (for a roll-back)."""
        deadline = time.monotonic() + self.settings.deploy_timeout_s
        with tempfile.TemporaryDirectory(prefix="splitinfer-opt-") as tmp:
            for plan in plans:
                dep = plan_deployment_name(name, plan.id)
                out = Path(tmp) / plan.id
                where = plan.assignment()

                def split_plan() -> Manifest:
                    specs = split_by_groups(graph, plan.groups())
                    # each part on the runtime the plan chose for it (its file exported to that runtime's format)
                    runtime = {n: p.runtime for p in plan.parts for n in p.nodes}
                    manifest = save_split_on_runtimes(graph, specs, out, origin,
                                                      {s.name: runtime.get(s.nodes[0]) for s in specs})
                    for part in manifest.parts:  # the cut tensors the plan sends compressed
                        for o in part.outputs:
                            o.codec = plan.compression.get(o.name)
                    manifest.save(out)
                    return manifest

                manifest = await self.run_in_worker(split_plan)
                placement = {p.name: [where[p.operations[0]]] for p in manifest.parts}
                deployed.append((dep, {}))
                await self.pool.upload_split(out, dep)
                deployed[-1] = (dep, placement)
                answers = await self.orders.load(dep, placement, timeout=max(10.0, deadline - time.monotonic()))
                failed = failures(answers)
                if failed:
                    raise DeployError(f"plan {plan.id}: {failed}")

    async def _roll_back(self, name: str, deployed: list[tuple[str, dict[str, list[str]]]]) -> None:
        """Unload what was loaded, delete what was stored: a failed deploy leaves nothing behind."""
        await self._remove_deployments(deployed)
        await self.pool.delete(name)
        self.log.warning("rolled_back", name=name, deployments=[d for d, _ in deployed])

    async def _remove_deployments(self, deployed: list[tuple[str, dict[str, list[str]]]]) -> None:
        for dep, placement in deployed:
            if placement:
                await self.orders.unload(dep, placement)
                await self._delete_queues(dep, placement)
            await self.pool.delete(dep)

    async def _delete_queues(self, dep: str, placement: dict[str, list[str]]) -> None:
        try:
            async with self.connection.scratch_channel() as channel:
                for part, servers in placement.items():
                    await delete_namespace_part(channel, self.names, dep, part, len(servers))
        except Exception as exc:  # queues also expire or stay harmless: nothing routes to a deleted deployment
            self.log.warning("queue_cleanup_failed", deployment=dep, error=first_line(exc))

    async def _unload_everywhere(self, dep: str) -> None:
        placement = await self.registry.placement(dep)
        if placement:
            await self.orders.unload(dep, placement)
            await self._delete_queues(dep, placement)

    async def undeploy(self, name: str) -> Reply:
        """A model deployment (every plan) or a plain split: unloaded from its servers, its queues deleted, and
        deleted from the pool."""
        doc = await self.pool.plan_table(name)
        if doc is None:
            listing = await self.pool.listing()
            if name not in listing.deployments:
                raise DeployError(f"no deployment {name!r} (the pool has: "
                                  f"{', '.join(listing.models + listing.deployments) or 'none'})")
            await self._unload_everywhere(name)
            r = await self.pool.delete(name)
            return Reply(ok=r.ok, message=f"{name} undeployed" if r.ok else r.message)
        table = PlanTable.from_json(doc.table)
        for plan in table.plans:
            await self._unload_everywhere(plan_deployment_name(name, plan.id))
        r = await self.pool.delete(name)
        self.models.pop(name, None)
        self.sources.pop(name, None)
        self.replanners.pop(name, None)
        self._stable.pop(name, None)
        self._variant_cost_graphs.pop(name, None)
        # front ends forget the table
        await self.publisher.publish("control", Names.plans_key(name), PlanTableMessage(name=name, removed=True),
                                     mandatory=False)
        return Reply(ok=r.ok, message=f"{name} undeployed ({len(table.plans)} plans)" if r.ok else r.message)

    # ------------------------------------------------------------------ what the planner sees
    async def cluster_view(self, wanted: list[str]) -> tuple[list[ActorInfo], str, ClusterState | None]:
        """Live model servers (only `wanted` ones when given), the front end's site, the state pool's state."""
        actors = await self.registry.who_hosts()
        live = [a for a in actors if a.kind == "model_server" and a.alive]
        if wanted:
            ids = {a.actor_id for a in live}
            unknown = [s for s in wanted if s not in ids]
            if unknown:
                raise DeployError(f"server {unknown[0]!r} is not registered (live model servers: "
                                  f"{', '.join(sorted(ids)) or 'none'})")
            live = [a for a in live if a.actor_id in set(wanted)]
        if not live:
            raise DeployError("no live model server to deploy on: start some (`splitinfer up --servers N`)")
        front = [a.site for a in actors if a.kind == "front_end" and a.alive]
        state = None
        try:
            state = await self.state_pool.get_state(timeout=min(5.0, self.settings.rpc_timeout_s))
        except Exception as exc:  # the registry's heartbeat states still give speeds; links fall back to settings
            self.log.warning("no_state_pool", error=first_line(exc))
        return live, (front[0] if front else ""), state

    def make_cluster(self, servers: list[ActorInfo], client_site: str, state: ClusterState | None) -> Cluster:
        """The planner's view of live servers: each one's speed over this (the profiling) machine's, slowdown,
        load, memory limit and power figures from its latest monitor state."""
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
            runtimes = tuple(a.state.runtimes) if a.state.runtimes is not None else None
            descs.append(ServerDesc(a.actor_id, a.site, speed=speed, load=load, memory=memory, power=power,
                                    runtimes=runtimes))
        emulated = self.settings.emulate_links  # the emulated links are the network; else nothing is slow
        return cluster_from(descs, client_site,
                            broker=BrokerOverhead.from_ms(self.settings.broker_per_message_ms,
                                                          self.settings.broker_per_mb_ms),
                            configured=self.settings.links if emulated else None,
                            default=self.settings.default_link if emulated else None,
                            measured=state.links if state else ())

    async def load_model(self, origin: str, input_shape: list[int] | None) -> ModelGraph:
        try:
            if origin.startswith("pool:"):
                origin = str(await self.pool.fetch_source(origin, self.settings.cache_dir / "sources"))
            shape = tuple(input_shape) if input_shape else None
            return await self.run_in_worker(lambda: ModelGraph(load_source_model(origin, shape)))
        except (SplitError, MessageError) as exc:
            raise DeployError(str(exc)) from None

    # ------------------------------------------------------------------ live re-prediction
    async def _push(self, name: str) -> None:
        table, cost_graph, doc = self.models[name]
        doc = doc.model_copy(update={"table": table.to_json(), "at": time.time()})
        self.models[name] = (table, cost_graph, doc)
        await self.publisher.publish("control", Names.plans_key(name), doc, mandatory=False)

    async def _replan_loop(self) -> None:
        await asyncio.sleep(min(self.settings.replan_interval_s or 1.0, 5.0))
        await self._adopt_pool_models()
        while not self.stopping and self.settings.replan_interval_s > 0:
            await asyncio.sleep(self.settings.replan_interval_s)
            if self._lock.locked():
                continue
            try:
                async with self._lock:  # a deploy or undeploy waits for a re-plan in progress, and the other way
                    await self.replan()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("replan_failed", error=first_line(exc))

    async def _adopt_pool_models(self) -> None:
        """After a restart: the model deployments already in the pool are re-predicted too."""
        try:
            for name in (await self.pool.listing()).models:
                if name not in self.models:
                    doc = await self.pool.plan_table(name)
                    if doc is not None:
                        self.models[name] = (PlanTable.from_json(doc.table), CostGraph.from_json(doc.cost_graph), doc)
        except Exception as exc:
            self.log.warning("adopt_failed", error=first_line(exc))

    async def replan(self) -> None:
        if not self.models:
            return
        actors = await self.registry.who_hosts()
        live = [a for a in actors if a.kind == "model_server" and a.alive]
        if not live:
            return
        front = [a.site for a in actors if a.kind == "front_end" and a.alive]
        try:
            state = await self.state_pool.get_state(timeout=min(5.0, self.settings.rpc_timeout_s))
        except Exception:
            state = None
        for name, (table, cost_graph, doc) in list(self.models.items()):
            servers = [a for a in live if not doc.servers or a.actor_id in doc.servers]
            if not servers:
                continue
            site = doc.client_site if doc.client_site is not None else (front[0] if front else "")
            cluster = self.make_cluster(servers, site, state)
            if cluster.client != table.client:  # the device is down: keep the deploy-time figures
                continue
            if doc.variant_graphs:  # each variant's plans on its own graph; (re-planning covers one-model tables)
                changed = False
                for variant, graph in self._variant_graphs(name, doc).items():
                    view = PlanTable(table.model, table.client, table.servers,
                                     [p for p in table.plans if p.variant == variant], objective=table.objective,
                                     compression=table.compression)
                    changed = bool(repredict(view, graph, cluster)) or changed
                if changed:
                    await self._push(name)
                continue
            if self.settings.learn_costs and state is not None and (state.hops or state.latencies):
                learned = learn(table, cost_graph, cluster, state.hops, state.latencies,
                                self._stable.setdefault(name, StableSince()), time.time())
                cluster = learned.apply(cluster)
                if learned.errors or learned.speed_factor:
                    self.log("costs_learned", deployment=name, **learned.describe())
            changed = bool(repredict(table, cost_graph, cluster))
            known = {s.name for s in cluster.servers}
            before = table.primary
            if keep_primary_current(table, [p for p in table.plans if p.servers <= known]):
                self.log("primary_changed", deployment=name, before=before, after=table.primary)
                await self._store_table(name)
                changed = True
            if self.settings.adaptive_replanning:
                changed = await self.adapt(name, cluster) or changed
            if changed:
                await self._push(name)

    # ------------------------------------------------------------------ run-time re-planning
    async def adapt(self, name: str, cluster: Cluster) -> bool:
        """Plan again on the live cluster; deploy a plan that beats the table by the policy's margin, retire plans
        nobody would get. True when the table changed."""
        table, cost_graph, _ = self.models[name]
        replanner = self.replanners.get(name)
        if replanner is None:
            deployed_at_start = sum(not p.id.startswith("r") for p in table.plans) or len(table.plans)
            replanner = self.replanners[name] = Replanner(self.policy, deployed_at_start)
        snapshot = PlanTable.from_json(table.to_json())  # planned in a worker thread: never the live table
        found = await self.run_in_worker(
            lambda: better_plan(snapshot, cost_graph, cluster, self.policy.threshold,
                                compression=snapshot.compression or None))
        now = time.monotonic()
        changed = False
        if replanner.observe(found, now):
            changed = await self._adopt(name, found, replanner)
        stale = replanner.stale(table, now)
        if stale:
            await self._retire(name, stale)
            changed = True
        return changed

    async def _adopt(self, name: str, found: Improvement, replanner: Replanner) -> bool:
        table, cost_graph, doc = self.models[name]
        table.revision += 1  # a plan id is never reused, even after a failed try (its queues may linger)
        plan = found.plan
        plan.id = f"r{table.revision}"
        deployed: list[tuple[str, dict[str, list[str]]]] = []
        t0 = time.monotonic()
        try:
            graph = await self._source_graph(name, doc)
            await self._deploy_plans(graph, name, doc.origin, [plan], deployed)
            table.plans.append(plan)
            table.primary = plan.id
            table.servers = sorted(set(table.servers) | plan.servers)
            await self._store_table(name)
        except Exception as exc:
            if table.plans and table.plans[-1] is plan:
                table.plans.pop()
            await self._remove_deployments(deployed)
            replanner.failed(time.monotonic())
            self.log.warning("replan_failed", deployment=name, plan=plan.id, error=first_line(exc))
            return False
        replanner.adopted(time.monotonic())
        self.log("replanned", deployment=name, plan=plan.id, seconds=round(time.monotonic() - t0, 2),
                 **found.describe(table))
        return True

    async def _retire(self, name: str, plan_ids: list[str]) -> None:
        """Out of the table now (front ends stop choosing them); off the servers once jobs already sent on them
        have had their deadline."""
        table = self.models[name][0]
        gone = [p for p in table.plans if p.id in plan_ids]
        table.plans = [p for p in table.plans if p.id not in plan_ids]
        await self._store_table(name)
        self.log("retired", deployment=name, plans=[f"{p.id}: {p.describe()} {p.latency * 1e3:.1f} ms" for p in gone],
                 table=[p.id for p in table.plans])
        self.spawn(self._unload_later([plan_deployment_name(name, p.id) for p in gone]), name="retire")

    async def _store_table(self, name: str) -> None:
        """The table as it is now, in the pool: an optimizer restarted later starts from it (its plans, primary)."""
        table, _, doc = self.models[name]
        await self.pool.store_plan_table(doc.model_copy(update={"table": table.to_json(), "at": time.time()}))

    async def _unload_later(self, deployments: list[str]) -> None:
        await asyncio.sleep(self.settings.job_deadline_s)
        for dep in deployments:
            try:
                await self._unload_everywhere(dep)
                await self.pool.delete(dep)
            except Exception as exc:  # best effort: an unused deployment costs storage, not correctness
                self.log.warning("retire_unload_failed", deployment=dep, error=first_line(exc))

    def _variant_graphs(self, name: str, doc: PlanTableMessage) -> dict[str, CostGraph]:
        if name not in self._variant_cost_graphs:
            self._variant_cost_graphs[name] = {v: CostGraph.from_json(g) for v, g in doc.variant_graphs.items()}
        return self._variant_cost_graphs[name]

    async def _source_graph(self, name: str, doc: PlanTableMessage) -> ModelGraph:
        """The model the deployment came from (kept since its deploy, or loaded again after a restart)."""
        if name not in self.sources:
            self.sources[name] = await self.load_model(doc.origin, doc.input_shape)
        return self.sources[name]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splitinfer.actors.optimizer", description=__doc__.splitlines()[0])
    ap.add_argument("--id", default="optimizer")
    args = ap.parse_args(argv)
    run_actor(Optimizer(args.id))
