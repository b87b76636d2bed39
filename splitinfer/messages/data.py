"""Data-plane messages: a job in, tensors between parts, one answer out (a result or an error)."""

from __future__ import annotations

import time
import uuid
from typing import ClassVar, Literal

from pydantic import Field

from splitinfer.messages.arrays import NDArray
from splitinfer.messages.wire import Frozen, Id, Message


class Hop(Frozen):
    """Where one part's time went for one request (seconds)."""

    part: str
    server: str
    transfer_s: float = 0.0    # producer's publish -> this server received the (last) input
    join_wait_s: float = 0.0   # first input received -> last input received (joins only)
    queue_wait_s: float = 0.0  # last input received -> compute started (worker queue)
    compute_s: float = 0.0     # the part's compiled function, batch included
    batch: int = 1
    finished_at: float = 0.0   # wall clock, for ordering
    via: str = "broker"        # how the inputs came: over the broker, or "local" from the part before, in-process


class Requirements(Frozen):
    """What a job asks of its plan (a model deployment's plan table): latency budget, battery, fidelity floor."""

    max_latency_s: float | None = None
    battery: float | None = None
    min_fidelity: float | None = None
    min_accuracy: float | None = Field(None, gt=0, le=1)  # a deployment of model variants: the least accuracy


class InferenceJob(Message):
    TYPE: ClassVar[str] = "job"
    job_id: Id = Field(default_factory=lambda: uuid.uuid4().hex)
    deployment: Id
    inputs: dict[str, NDArray]
    deadline_s: float | None = Field(None, gt=0)
    reply_to: str | None = None
    requirements: Requirements = Field(default_factory=Requirements)
    submitted_at: float = Field(default_factory=time.time)


class TensorMessage(Message):
    """One tensor of one request on the data plane (also the final outputs). AMQP header request_id too."""

    TYPE: ClassVar[str] = "tensor"
    request_id: Id
    deployment: Id
    tensor: Id
    array: NDArray
    produced_by: str = ""          # part name, "" for a model input
    server: str = ""               # producing actor
    sent_at: float = Field(default_factory=time.time)
    deadline: float | None = None  # absolute wall-clock time; servers skip expired work
    reply_to: str | None = None
    hops: list[Hop] = Field(default_factory=list)
    site: str = ""                 # producer's site: link emulation delays a tensor that crosses sites
    # Sent compressed (compress_array): `array` is in the codec's dtype (float16 / int8, with `scale` for int8);
    # a receiver calls decompress_array(array, codec, scale, manifest dtype) before check_tensor.
    codec: Literal["float16", "int8"] | None = None
    scale: float | None = None


class ResultMessage(Message):
    TYPE: ClassVar[str] = "result"
    job_id: Id
    deployment: Id
    outputs: dict[str, NDArray]
    hops: list[Hop] = Field(default_factory=list)
    latency_s: float | None = None
    served_by: list[str] = Field(default_factory=list)
    plan: str | None = None             # the plan that ran, when `deployment` is a model with a plan table
    plan_deployment: str | None = None  # the deployment of that plan (`<deployment>:<plan>`)


class ErrorResult(Message):
    TYPE: ClassVar[str] = "error"
    job_id: str | None = None
    deployment: str | None = None
    code: str
    message: str
    where: str = ""
    at: float = Field(default_factory=time.time)
    plan: str | None = None
