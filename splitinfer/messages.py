"""Wire messages: pydantic types with a schema version, and the msgpack codec (numpy arrays as an ext type).

Pure: imports no broker code. Every message on the wire is one msgpack map ``{"v": SCHEMA_VERSION, "type": ..., ...}``.
`encode(msg)` gives bytes; `decode(data)` gives the typed message or raises `MessageError` with a one-line reason
(``err.code`` is a short machine code, ``err.job_id`` the request/job id when one could be recovered).

Arrays travel as msgpack ext type `NDARRAY_EXT` whose payload is
``u8 len(dtype) | dtype str (numpy .str, e.g. "<f4") | u8 ndim | ndim x u64 little-endian dims | raw C-order bytes``
and decode with `np.frombuffer` straight on the ext payload (no extra copy; the arrays are read-only).

A tensor may travel compressed (`TensorMessage.codec`): float16, or int8 with a per-tensor `scale`;
`compress_array` / `decompress_array` convert, and a receiver restores the manifest dtype before checking it.

Checks on every decode: total size <= max_bytes, nesting depth <= MAX_DEPTH, dtype in the allow-list,
ndim <= MAX_NDIM, prod(shape) x itemsize == number of bytes, schema version, message type, and the pydantic
model of that type (extra fields forbidden). No pickle, no eval, no object dtypes.
"""

from __future__ import annotations

import struct
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, Union

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, TypeAdapter, ValidationError, WithJsonSchema
from pydantic.functional_validators import PlainValidator

SCHEMA_VERSION = 1
NDARRAY_EXT = 1
MAX_DEPTH = 16
MAX_NDIM = 8
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_ID_LEN = 256

# Little-endian / byte-order-free numpy type strings only: no object, string, void or structured dtypes.
ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"}
)


class MessageError(ValueError):
    """A message that cannot be decoded or validated. str(err) is one line: the reason."""

    def __init__(self, reason: str, code: str = "bad_message", job_id: str | None = None):
        reason = " ".join(str(reason).split())[:400]
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.job_id = job_id


# --------------------------------------------------------------------------------------------------- arrays

def _check_array(value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(value).__name__}")
    if value.dtype.str not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {value.dtype.str} is not allowed")
    if value.ndim > MAX_NDIM:
        raise ValueError(f"array has {value.ndim} dimensions, at most {MAX_NDIM} allowed")
    return value


NDArray = Annotated[
    np.ndarray,
    PlainValidator(_check_array),
    PlainSerializer(lambda a: a, return_type=Any, when_used="always"),
    WithJsonSchema({"type": "object", "description": "numpy array (msgpack ext type)"}),
]

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)]


def pack_array(arr: np.ndarray) -> msgpack.ExtType:
    _check_array(arr)
    if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        arr = np.ascontiguousarray(arr)
    dt = arr.dtype.str.encode()
    header = struct.pack(f"<B{len(dt)}sB{arr.ndim}Q", len(dt), dt, arr.ndim, *arr.shape)
    return msgpack.ExtType(NDARRAY_EXT, header + arr.tobytes())


def unpack_array(payload: bytes) -> np.ndarray:
    """Parse and check the ext payload; the array is a read-only view on `payload` (no copy)."""
    n = len(payload)
    if n < 2:
        raise MessageError("array header truncated", "bad_array")
    dl = payload[0]
    if n < 1 + dl + 1:
        raise MessageError("array header truncated", "bad_array")
    try:
        dtype_str = bytes(payload[1:1 + dl]).decode("ascii")
    except UnicodeDecodeError:
        raise MessageError("array dtype is not ascii", "bad_array") from None
    if dtype_str not in ALLOWED_DTYPES:
        raise MessageError(f"dtype {dtype_str!r} is not allowed", "bad_dtype")
    ndim = payload[1 + dl]
    if ndim > MAX_NDIM:
        raise MessageError(f"array has {ndim} dimensions, at most {MAX_NDIM} allowed", "bad_array")
    off = 2 + dl
    if n < off + 8 * ndim:
        raise MessageError("array shape truncated", "bad_array")
    shape = struct.unpack_from(f"<{ndim}Q", payload, off)
    off += 8 * ndim
    dtype = np.dtype(dtype_str)
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != n - off:
        raise MessageError(
            f"array shape {tuple(shape)} x itemsize {dtype.itemsize} = {count * dtype.itemsize} bytes, "
            f"but {n - off} bytes were sent", "bad_array")
    return np.frombuffer(payload, dtype=dtype, count=count, offset=off).reshape(shape)


# --------------------------------------------------------------------------------------------------- codecs

CODECS: tuple[str, ...] = ("float16", "int8")
_CODEC_DTYPE = {"float16": np.dtype(np.float16), "int8": np.dtype(np.int8)}


def _float_dtype(dtype: Any, what: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise MessageError(f"{what} {dtype!r} is not a numpy dtype", "bad_codec") from None
    if dt.kind != "f":
        raise MessageError(f"{what} {dt.name} is not a float dtype", "bad_codec")
    return dt


def _check_codec(codec: Any) -> str:
    if not isinstance(codec, str) or codec not in _CODEC_DTYPE:
        raise MessageError(f"unknown codec {codec!r}, expected one of {', '.join(CODECS)}", "bad_codec")
    return codec


def compress_array(arr: np.ndarray, codec: str) -> tuple[np.ndarray, float | None]:
    """A float array in the codec's dtype, and the int8 scale (None for float16).

    float16: a cast (values beyond +-65504 become inf). int8: symmetric per-tensor quantisation,
    scale = max|arr| / 127 (1.0 for an all-zero tensor), q = clip(round(arr / scale), -127, 127); the error of
    each element is at most scale / 2. Refuses (MessageError "bad_codec") an unknown codec, a non-float array
    and, for int8, NaN or infinite values.
    """
    _check_codec(codec)
    if not isinstance(arr, np.ndarray):
        raise MessageError(f"expected a numpy array, got {type(arr).__name__}", "bad_codec")
    _float_dtype(arr.dtype, "array dtype")
    if codec == "float16":
        with np.errstate(over="ignore"):  # documented above: no RuntimeWarning per message on a server
            return arr.astype(np.float16), None
    if arr.size and not np.isfinite(arr).all():
        raise MessageError("int8 codec: the array has NaN or infinite values", "bad_codec")
    peak = float(np.max(np.abs(arr))) if arr.size else 0.0
    scale = peak / 127.0
    if not scale > 0.0:  # all zeros (or so tiny that peak / 127 underflows: every value rounds to 0)
        scale = 1.0
    work = np.result_type(arr.dtype, np.float32)  # float16 inputs are divided in float32
    q = np.clip(np.rint(arr.astype(work, copy=False) / work.type(scale)), -127, 127)
    return np.asarray(q).astype(np.int8), scale  # (numpy gives a scalar, not a 0-d array, for a 0-d input)


def decompress_array(arr: np.ndarray, codec: str, scale: float | None, dtype: Any) -> np.ndarray:
    """Undo `compress_array`: the array back in `dtype` (the original float dtype, e.g. "float32" or "<f4").

    Refuses (MessageError "bad_codec") an unknown codec, an array not in the codec's dtype (float16 / int8),
    a non-float target dtype, and for int8 a missing, non-finite or non-positive scale.
    """
    _check_codec(codec)
    if not isinstance(arr, np.ndarray):
        raise MessageError(f"expected a numpy array, got {type(arr).__name__}", "bad_codec")
    want = _float_dtype(dtype, "target dtype")
    if arr.dtype != _CODEC_DTYPE[codec]:
        raise MessageError(f"{codec} codec: array has dtype {arr.dtype.name}, expected {codec}", "bad_codec")
    if codec == "float16":
        return arr.astype(want)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise MessageError(f"int8 codec needs a numeric scale, got {scale!r}", "bad_codec")
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0.0:
        raise MessageError(f"int8 codec: scale {scale!r} is not a finite positive number", "bad_codec")
    work = np.result_type(want, np.float32)  # a float16 target is scaled in float32, then cast
    return np.asarray(arr.astype(work) * work.type(scale)).astype(want, copy=False)


# --------------------------------------------------------------------------------------------------- messages

class Message(BaseModel):
    """Base of every wire message. `type` names the class on the wire; `v` is the schema version."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=False)
    TYPE: ClassVar[str] = ""
    v: int = SCHEMA_VERSION


class Hop(BaseModel):
    """Where one part's time went for one request (seconds)."""

    model_config = ConfigDict(extra="forbid")
    part: str
    server: str
    transfer_s: float = 0.0    # producer's publish -> this server received the (last) input
    join_wait_s: float = 0.0   # first input received -> last input received (joins only)
    queue_wait_s: float = 0.0  # last input received -> compute started (worker queue)
    compute_s: float = 0.0     # the part's compiled function, batch included
    batch: int = 1
    finished_at: float = 0.0   # wall clock, for ordering


class Requirements(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_latency_s: float | None = None
    battery: float | None = None
    min_fidelity: float | None = None


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


class PartRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    deployment: Id
    part: Id
    replica: int = Field(0, ge=0)
    replicas: int = Field(1, ge=1)


class ServerState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpu_percent: float | None = None
    memory_mb: float | None = None
    load: float | None = None            # work items queued or running
    queue_depths: dict[str, int] = Field(default_factory=dict)
    processed: int = 0
    errors: int = 0
    # server / device monitor (splitinfer.monitor.runtime): what the optimizer and the front end plan with
    site: str = ""
    load_avg: float | None = None        # 1-minute system load average
    speed_gflops: float | None = None    # calibrated (cached calibration) or configured speed, before slowdown
    slowdown: float = 1.0                # emulated slower device: compute takes this many times longer
    battery: float | None = None         # 0..1; None: not a battery device
    battery_source: str | None = None    # "sensor" (psutil) or "simulated" (energy model)
    energy_j: float | None = None        # energy the device spent since start (simulated battery)
    compute_s: float = 0.0               # compute seconds since start (slowdown included)
    power: "PowerSpec | None" = None     # a battery device's power figures (the planner's device energy model)
    memory_limit_mb: float | None = None  # weights this server may hold (the planner's memory limit); None: any


class Register(Message):
    TYPE: ClassVar[str] = "register"
    actor_id: Id
    kind: str = "model_server"
    site: str = ""
    capacity: float = 1.0
    parts: list[PartRef] = Field(default_factory=list)
    host: str = ""
    pid: int = 0


class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    actor_id: Id
    kind: str = "model_server"
    site: str = ""
    capacity: float = 1.0
    parts: list[PartRef] = Field(default_factory=list)
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


class DeployModel(Message):
    """A deploy request for the optimizer (control key `optimizer.deploy`, RPC): profile, plan, split, store the
    plans' parts in the model pool, have the servers load them; the answer is a Reply whose data holds the plan
    table. `model` is `keras.applications:NAME` or `pool:<sha256>` (a .keras file uploaded to the pool's sources)."""

    TYPE: ClassVar[str] = "deploy_model"
    name: Id = Field(pattern=r"^[A-Za-z0-9_-]+$")
    model: Id
    input_shape: list[int] | None = None
    objective: Literal["latency", "energy", "throughput"] = "latency"
    sla_s: float | None = Field(None, gt=0)        # every plan must be predicted to meet it
    servers: list[Id] = Field(default_factory=list)  # only these (each must be registered and alive); []: all live
    client_site: str | None = None                 # where jobs' inputs start; default: the front end's site
    compression: bool = False                      # let the planner send cut tensors as float16 / int8
    max_plans: int = Field(6, ge=1, le=32)


class PlanTableMessage(Message):
    """A model deployment's plan table (JSON of planner.table.PlanTable plus its cost graph), stored in the model
    pool as `<name>/plans.json` and pushed on control key `plans.<name>` whenever the optimizer re-predicts it."""

    TYPE: ClassVar[str] = "plan_table"
    name: Id
    table: str = Field(max_length=16 * 1024 * 1024)
    at: float = Field(default_factory=time.time)


class DeleteDeployment(Message):
    """Model pool (key `pool.upload`, RPC): forget a deployment or a model's plan table and its plans' files."""

    TYPE: ClassVar[str] = "delete_deployment"
    deployment: Id


class WhoHosts(Message):
    """Registry query (RPC): live actors, optionally only those hosting a deployment / part."""

    TYPE: ClassVar[str] = "who_hosts"
    deployment: str | None = None
    part: str | None = None
    include_dead: bool = False


class ActorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    actor_id: str
    kind: str
    site: str = ""
    capacity: float = 1.0
    parts: list[PartRef] = Field(default_factory=list)
    alive: bool = True
    last_seen: float = 0.0
    state: ServerState = Field(default_factory=ServerState)


class Hosts(Message):
    TYPE: ClassVar[str] = "hosts"
    actors: list[ActorInfo] = Field(default_factory=list)


class PoolManifest(Message):
    """A deployment's manifest (JSON text) sent to or from the model pool."""

    TYPE: ClassVar[str] = "pool_manifest"
    deployment: Id
    manifest: str = Field(max_length=16 * 1024 * 1024)


class PartChunk(Message):
    """One chunk of a part file, to the pool (upload) or from it (download)."""

    TYPE: ClassVar[str] = "part_chunk"
    deployment: Id
    file: Id
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    size: int = Field(ge=0)        # whole file, bytes
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # whole file
    data: bytes


class PartRequest(Message):
    """Ask the pool for one chunk of a file (`file` "manifest.json" gives the manifest as PoolManifest)."""

    TYPE: ClassVar[str] = "part_request"
    deployment: Id
    file: Id
    index: int = Field(0, ge=0)


class ListDeployments(Message):
    TYPE: ClassVar[str] = "list_deployments"


class Reply(Message):
    """Generic RPC answer."""

    TYPE: ClassVar[str] = "reply"
    ok: bool = True
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class LinkSpec(BaseModel):
    """An emulated link between two sites (symmetric): round-trip time and bandwidth (None: unlimited)."""

    model_config = ConfigDict(extra="forbid")
    rtt_ms: float = Field(0.0, ge=0)
    bandwidth_mbps: float | None = Field(None, gt=0)  # megabits per second


class PowerSpec(BaseModel):
    """Power draw of a battery device, watts (same figures as planner.model.PowerProfile)."""

    model_config = ConfigDict(extra="forbid")
    compute_w: float = Field(2.5, ge=0)
    radio_w: float = Field(1.2, ge=0)
    idle_w: float = Field(0.3, ge=0)


ServerState.model_rebuild()


class SetLinks(Message):
    """Change the emulated link table at run time (control key `links.set`, every actor that receives tensors
    follows it): a benchmark sweeps bandwidth without restarting actors. `replace` drops links not listed;
    `emulate` None leaves emulation on/off as it is; `default` None leaves the default link as it is."""

    TYPE: ClassVar[str] = "set_links"
    links: dict[str, LinkSpec] = Field(default_factory=dict)  # "siteA-siteB"
    default: LinkSpec | None = None
    emulate: bool | None = None
    replace: bool = True


class Probe(Message):
    """Network-monitor probe (control key `probe.<actor>`, RPC): the receiver delays it as a tensor of
    len(payload) bytes from `site`, then answers a ProbeReply of `reply_bytes` bytes."""

    TYPE: ClassVar[str] = "probe"
    probe_id: Id
    site: str = ""
    payload: bytes = b""
    reply_bytes: int = Field(0, ge=0, le=16 * 1024 * 1024)  # the reply carries this many bytes (the way back)


class ProbeReply(Message):
    TYPE: ClassVar[str] = "probe_reply"
    probe_id: Id
    site: str = ""
    payload: bytes = b""


class LinkState(BaseModel):
    """A directed link as measured by a network monitor: src_site -> dst_site."""

    model_config = ConfigDict(extra="forbid")
    src_site: str
    dst_site: str
    rtt_ms: float
    bandwidth_mbps: float | None = None  # None: too fast to measure with the probe size
    measured_at: float = Field(default_factory=time.time)
    by: str = ""                         # the probing actor
    target: str = ""                     # the actor probed


class LinkReport(Message):
    """A network monitor's measurement, pushed to the state pool (control key `state.link`)."""

    TYPE: ClassVar[str] = "link_report"
    link: LinkState


class GetState(Message):
    """State-pool query (control key `state_pool.query`, RPC) -> ClusterState."""

    TYPE: ClassVar[str] = "get_state"
    include_dead: bool = False


class ClusterState(Message):
    """The latest state of every actor (server and device monitors: ActorInfo.state) and every measured link."""

    TYPE: ClassVar[str] = "cluster_state"
    actors: list[ActorInfo] = Field(default_factory=list)
    links: list[LinkState] = Field(default_factory=list)
    at: float = Field(default_factory=time.time)

    def servers(self) -> list[ActorInfo]:
        return [a for a in self.actors if a.kind == "model_server"]

    def link(self, src_site: str, dst_site: str) -> LinkState | None:
        return next((x for x in self.links if x.src_site == src_site and x.dst_site == dst_site), None)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (InferenceJob, TensorMessage, ResultMessage, ErrorResult, Register, Heartbeat, Deregister, LoadPart,
                UnloadPart, DeployModel, PlanTableMessage, DeleteDeployment, WhoHosts, Hosts, PoolManifest, PartChunk, PartRequest, ListDeployments, Reply)
}

MESSAGE_TYPES.update({cls.TYPE: cls for cls in (SetLinks, Probe, ProbeReply, LinkReport, GetState, ClusterState)})

AnyMessage = Union[tuple(MESSAGE_TYPES.values())]  # type: ignore[valid-type]


# --------------------------------------------------------------------------------------------------- codec

def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="python")
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode(msg: Message) -> bytes:
    """The message as msgpack bytes (arrays as ext type)."""
    if not isinstance(msg, Message) or not msg.TYPE:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    body = _prepare(msg.model_dump(mode="python"))
    body["v"] = SCHEMA_VERSION
    body["type"] = msg.TYPE
    return msgpack.packb(body, default=_default, use_bin_type=True)


def _prepare(obj: Any) -> Any:
    """Arrays -> ExtType up front (msgpack's `default` path is ~30x slower on a large ndarray)."""
    if isinstance(obj, np.ndarray):
        return pack_array(obj)
    if isinstance(obj, dict):
        return {k: _prepare(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_prepare(v) for v in obj]
    return obj


def _ext_hook(code: int, data: bytes) -> Any:
    if code == NDARRAY_EXT:
        return unpack_array(data)
    raise MessageError(f"unknown msgpack ext type {code}", "bad_message")


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of containers, stopping at limit+1 (iterative, so a deep message cannot blow the stack)."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list, tuple)):
            if d > limit:
                return d
            deepest = max(deepest, d)
            children = o.values() if isinstance(o, dict) else o
            stack.extend((c, d + 1) for c in children)
    return deepest


def _recover_id(obj: Any) -> str | None:
    if isinstance(obj, dict):
        for key in ("job_id", "request_id"):
            v = obj.get(key)
            if isinstance(v, str) and 0 < len(v) <= MAX_ID_LEN:
                return v
    return None


def decode(data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES,
           expect: type[Message] | tuple[type[Message], ...] | None = None) -> Message:
    """Bytes -> a validated message, or MessageError. `expect` restricts the accepted types."""
    size = len(data)
    if size > max_bytes:
        raise MessageError(f"message of {size} bytes exceeds the limit of {max_bytes}", "too_large")
    if size == 0:
        raise MessageError("empty message", "bad_message")
    try:
        obj = msgpack.unpackb(
            data, ext_hook=_ext_hook, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=max_bytes, max_str_len=min(max_bytes, 16 * 1024 * 1024),
            max_ext_len=max_bytes, max_array_len=1_000_000, max_map_len=100_000,
        )
    except MessageError:
        raise
    except Exception as exc:  # msgpack raises ExtraData, FormatError, StackError, ValueError, ...
        raise MessageError(f"not valid msgpack: {type(exc).__name__}: {exc}", "bad_message") from None
    if not isinstance(obj, dict):
        raise MessageError(f"message is a {type(obj).__name__}, not a map", "bad_message")
    job_id = _recover_id(obj)
    if _depth(obj, MAX_DEPTH) > MAX_DEPTH:
        raise MessageError(f"message nests deeper than {MAX_DEPTH} levels", "too_deep", job_id)
    version = obj.pop("v", None)
    if version != SCHEMA_VERSION:
        raise MessageError(f"schema version {version!r}, expected {SCHEMA_VERSION}", "bad_version", job_id)
    kind = obj.pop("type", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MessageError(f"unknown message type {kind!r}", "bad_type", job_id)
    if expect is not None and not issubclass(cls, expect):
        names = ", ".join(c.TYPE for c in (expect if isinstance(expect, tuple) else (expect,)))
        raise MessageError(f"expected a {names} message, got {kind!r}", "bad_type", job_id)
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or kind
        raise MessageError(f"invalid {kind} message: {where}: {err['msg']}", "invalid", job_id) from None


def check_tensor(arr: np.ndarray, shape: list[int | None] | tuple, dtype: str, name: str = "tensor",
                 job_id: str | None = None) -> None:
    """A tensor against its manifest spec: same dtype, same rank, equal fixed dims (None matches any)."""
    want = np.dtype(dtype)
    if arr.dtype != want:
        raise MessageError(f"{name}: dtype {arr.dtype.name}, expected {want.name}", "wrong_dtype", job_id)
    if arr.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape, arr.shape)):
        spec = tuple(shape)
        raise MessageError(f"{name}: shape {tuple(arr.shape)}, expected {spec}", "wrong_shape", job_id)


__all__ = [
    "ClusterState", "GetState", "LinkReport", "LinkSpec", "LinkState", "PowerSpec", "Probe", "ProbeReply",
    "SetLinks",
    "CODECS", "compress_array", "decompress_array",
    "ALLOWED_DTYPES", "ActorInfo", "AnyMessage", "DeleteDeployment", "DeployModel", "Deregister", "ErrorResult", "Heartbeat", "Hop", "Hosts",
    "InferenceJob", "ListDeployments", "LoadPart", "MAX_DEPTH", "MAX_NDIM", "MESSAGE_TYPES", "Message", "MessageError",
    "NDArray", "PartChunk", "PartRef", "PartRequest", "PlanTableMessage", "PoolManifest", "Register", "Reply", "Requirements",
    "ResultMessage", "SCHEMA_VERSION", "ServerState", "TensorMessage", "UnloadPart", "WhoHosts", "check_tensor",
    "decode", "encode", "pack_array", "unpack_array",
]
