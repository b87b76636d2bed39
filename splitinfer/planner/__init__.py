"""Planner: the cost model, the algorithms that choose cuts and placement, the plan table, per-request choice.

Pure: no broker code, and no TensorFlow at import time (the adapter takes a ModelGraph someone else built).

Inputs: a CostGraph (operations with cost in FLOPs or reference seconds and weight bytes, tensors with bytes,
model inputs held by the client, outputs returned to it; `cost_graph_from(model_graph, node_costs)` builds one)
and a Cluster (servers with site, speed, load, memory, optional power profile; links between sites; the client;
the per-hop broker overhead, 0.7 ms + 2.5 ms/MB by default). See costmodel.py for the exact cost model.

Algorithms and what they optimise:
- plan_chain / chain_pareto (chain.py): exact DP over the graph's single-tensor cut points. A plan is a sequence
  of segments on servers (a server may host several parts, e.g. the device first and last). Objectives: minimum
  end-to-end latency; minimum device energy within a latency budget; the whole Pareto front over (latency,
  energy, fidelity) with optional float16/int8 compression at the cuts. Memory limits are exact (per server,
  summed over all its parts). The DP never splits parallel branches across servers (they lie inside a segment).
- plan_dag (milp.py): integer program over node-to-server assignments of any DAG. "latency"/"energy": one part
  per server, each part starts when all its inputs have arrived and runs its operations one after another;
  latency is the critical path over the parts (start-time variables, big-M switched per server pair), so
  parallel branches on different servers overlap. "throughput": minimise the busiest stage per request (each
  server's compute, each directed site-to-site link's bytes / bandwidth). Large DAGs are coarsened into
  contiguous blocks first (max_nodes); then the program is exact for placing the blocks.
- plan_deployment / repredict (optimize.py): a deployment's plan table for an objective and SLA, capped at
  max_plans, from a Cluster built out of live monitor state or a cluster description (build_cluster,
  combine_links); re-prediction of its plans as that state changes.
- build_plan_table / choose_plan (table.py): the Pareto set over (latency, energy, fidelity) of the DP front and
  the MILP plans, plus fallbacks (plans Pareto-optimal when one used server is down); per request: drop plans
  on down servers, below min_fidelity, over max_latency; low battery -> least energy, else fastest.
Errors are PlanError with a one-line message (unreachable SLA with the best achievable latency, unknown server,
no server can hold a part, nothing fits memory, fidelity floor unreachable).
"""

from splitinfer.messages import OBJECTIVES, plan_deployment_name
from splitinfer.planner.adapter import cost_graph_from, cost_graph_from_profile, param_bytes_of
from splitinfer.planner.chain import chain_pareto, plan_chain
from splitinfer.planner.costmodel import CostModel, Prediction, evaluate
from splitinfer.planner.milp import coarsen, plan_dag
from splitinfer.planner.model import (
    CODEC_FACTOR,
    BrokerOverhead,
    Cluster,
    CostGraph,
    CostNode,
    CostTensor,
    Link,
    PlanError,
    PowerProfile,
    Server,
)
from splitinfer.planner.optimize import (
    LinkFigures,
    ServerDesc,
    build_cluster,
    cluster_from,
    cluster_from_config,
    combine_links,
    link_figures,
    parse_duration,
    plan_deployment,
    repredict,
)
from splitinfer.planner.plan import Plan, PlanPart, make_plan, parts_from_assignment
from splitinfer.planner.table import PlanTable, build_plan_table, choose_plan, pareto

__all__ = [
    "CODEC_FACTOR",
    "OBJECTIVES",
    "LinkFigures",
    "ServerDesc",
    "build_cluster",
    "cluster_from",
    "cluster_from_config",
    "link_figures",
    "combine_links",
    "cost_graph_from_profile",
    "parse_duration",
    "plan_deployment",
    "plan_deployment_name",
    "repredict",
    "BrokerOverhead",
    "Cluster",
    "CostGraph",
    "CostModel",
    "CostNode",
    "CostTensor",
    "Link",
    "Plan",
    "PlanError",
    "PlanPart",
    "PlanTable",
    "PowerProfile",
    "Prediction",
    "Server",
    "build_plan_table",
    "chain_pareto",
    "choose_plan",
    "coarsen",
    "cost_graph_from",
    "evaluate",
    "make_plan",
    "pareto",
    "param_bytes_of",
    "parts_from_assignment",
    "plan_chain",
    "plan_dag",
]
