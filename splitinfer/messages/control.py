"""Control-plane messages: actors announcing themselves, orders to servers, the optimizer's deploys and plan tables,
and the generic acknowledgement."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal, get_args

from pydantic import Field

from splitinfer.messages.state import PartRef, ServerState
from splitinfer.messages.wire import Frozen, Id, Message


# What a model deployment optimises: the planner's objectives, in one place.
Objective = Literal["latency", "energy", "throughput"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)


class Announcement(Message):
    """What an actor says of itself in a Register and in every Heartbeat: who, where, what it hosts."""

    actor_id: Id
    kind: str = "model_server"
    site: str = ""
    capacity: float = 1.0
    parts: list[PartRef] = Field(default_factory=list)


class Register(Announcement):
    TYPE: ClassVar[str] = "register"
    host: str = ""
    pid: int = 0


class Heartbeat(Announcement):
    TYPE: ClassVar[str] = "heartbeat"
    state: ServerState = Field(default_factory=ServerState)
    interval_s: float = 2.0
    sent_at: float = Field(default_factory=time.time)


class Deregister(Message):
    TYPE: ClassVar[str] = "deregister"
    actor_id: Id
    reason: str = ""


class LoadPart(Message):
    """Order to a model server (routing key load.<server>): fetch the part from the pool if needed, serve it."""

    TYPE: ClassVar[str] = "load_part"
    server_id: Id
    deployment: Id
    part: Id
    replica: int = Field(0, ge=0)
    replicas: int = Field(1, ge=1)


class UnloadPart(Message):
    TYPE: ClassVar[str] = "unload_part"
    server_id: Id
    deployment: Id
    part: Id


class Reply(Message):
    """The answer to an order or an upload: done or not, and why in one line."""

    TYPE: ClassVar[str] = "reply"
    ok: bool = True
    message: str = ""


class ModelVariant(Frozen):
    """Another model that answers the same jobs (the reference's input and output tensors): smaller and faster,
    say, or a float16 copy. `accuracy` in (0, 1] as the user knows it; None: its fidelity to the reference, measured
    on sample inputs (top-1 agreement), times the reference's accuracy."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$", max_length=40)
    model: Id
    input_shape: list[int] | None = None
    accuracy: float | None = Field(None, gt=0, le=1)


class DeployModel(Message):
    """A deploy request for the optimizer (control key `optimizer.deploy`, RPC): profile, plan, split, store the
    plans' parts in the model pool, have the servers load them; the answer is a DeployReply (or a Reply saying why
    not). `model` is `keras.applications:NAME` or `pool:<sha256>` (a .keras file uploaded to the pool's sources)."""

    TYPE: ClassVar[str] = "deploy_model"
    name: Id = Field(pattern=r"^[A-Za-z0-9_-]+$")
    model: Id
    input_shape: list[int] | None = None
    objective: Objective = "latency"
    sla_s: float | None = Field(None, gt=0)        # every plan must be predicted to meet it
    servers: list[Id] = Field(default_factory=list)  # only these (each must be registered and alive); []: all live
    client_site: str | None = None                 # where jobs' inputs start; default: the front end's site
    compression: bool = False                      # let the planner send cut tensors as float16 / int8
    max_plans: int = Field(6, ge=1, le=32)
    keep_on_device: str | None = None              # a privacy floor: the first K operations, or up to a tensor
    # model variants: the plan table spans them, a job's min_accuracy or budget picks; `model` is the reference
    accuracy: float | None = Field(None, gt=0, le=1)  # the reference's accuracy (None: 1.0, the yardstick)
    variants: list[ModelVariant] = Field(default_factory=list, max_length=8)


class UndeployModel(Message):
    """The optimizer (control key `optimizer.undeploy`, RPC): unload every plan of a model deployment, delete it."""

    TYPE: ClassVar[str] = "undeploy_model"
    name: Id


def plan_deployment_name(model: str, plan_id: str) -> str:
    """Plan `plan_id` of model deployment `model` is served as a deployment of its own: `<model>:<plan>` (':' is
    not allowed in a model deployment's name, so this never collides with one)."""
    return f"{model}:{plan_id}"


class PlanTableMessage(Message):
    """A model deployment's plan table (planner.PlanTable.to_json()) with what re-planning needs: its cost graph
    (planner.CostGraph.to_json()) and where the model came from. Stored in the model pool as `<name>/plans.json`,
    pushed on control key `plans.<name>` whenever the optimizer re-predicts it; `removed` says it was undeployed."""

    TYPE: ClassVar[str] = "plan_table"
    name: Id
    table: dict[str, Any] = Field(default_factory=dict)
    cost_graph: dict[str, Any] = Field(default_factory=dict)
    origin: str = ""
    input_shape: list[int] | None = None
    servers: list[Id] = Field(default_factory=list)  # the deploy's own choice of servers ([]: every live one)
    variants: list[ModelVariant] = Field(default_factory=list)  # the other variants the table spans
    variant_graphs: dict[str, dict[str, Any]] = Field(default_factory=dict)  # variant -> its cost graph
    client_site: str | None = None                  # the deploy's client site (None: the front end's)
    deployed_at: float = 0.0
    removed: bool = False
    at: float = Field(default_factory=time.time)


class DeployReply(Message):
    """The optimizer's answer to a deploy that succeeded: the plan table, each plan's deployment, where time went."""

    TYPE: ClassVar[str] = "deploy_reply"
    name: Id
    message: str = ""
    table: dict[str, Any]
    deployments: dict[str, str] = Field(default_factory=dict)   # plan id -> `<name>:<plan>`
    timings_s: dict[str, float] = Field(default_factory=dict)
