"""Wire messages, by concept: `arrays` (arrays, checks, codecs), `wire` (the envelope: base class, encode/decode),
`data` (jobs, tensors, answers), `control` (actors, orders, deploys, plan tables), `pool` (part files in chunks),
`state` (liveness, monitored state, links). Pure: imports no broker code.

Everything is re-exported here: `from splitinfer.messages import TensorMessage, decode`.
"""

from splitinfer.messages.arrays import (
    ALLOWED_DTYPES,
    CODECS,
    MAX_NDIM,
    NDARRAY_EXT,
    MessageError,
    NDArray,
    check_tensor,
    compress_array,
    decompress_array,
    pack_array,
    unpack_array,
)
from splitinfer.messages.control import (
    OBJECTIVES,
    Objective,
    DeployModel,
    DeployReply,
    Deregister,
    Heartbeat,
    LoadPart,
    ModelVariant,
    PlanTableMessage,
    Register,
    Reply,
    UndeployModel,
    UnloadPart,
    plan_deployment_name,
)
from splitinfer.messages.data import ErrorResult, Hop, InferenceJob, Requirements, ResultMessage, TensorMessage
from splitinfer.messages.pool import (
    DeleteDeployment,
    DeploymentList,
    ListDeployments,
    PartChunk,
    PartRequest,
    PoolManifest,
)
from splitinfer.messages.state import (
    ActorInfo,
    ClusterState,
    GetState,
    Hosts,
    LinkReport,
    HopReport,
    HopStat,
    DeploymentLatency,
    LinkSpec,
    LinkState,
    PartRef,
    PowerSpec,
    Probe,
    ProbeReply,
    ServerState,
    SetLinks,
    WhoHosts,
    split_pair,
)
from splitinfer.messages.wire import (
    DEFAULT_MAX_BYTES,
    MAX_DEPTH,
    MAX_ID_LEN,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    Frozen,
    Id,
    Message,
    decode,
    encode,
)

__all__ = [
    "ALLOWED_DTYPES", "CODECS", "DEFAULT_MAX_BYTES", "MAX_DEPTH", "MAX_ID_LEN", "MAX_NDIM", "MESSAGE_TYPES",
    "NDARRAY_EXT", "OBJECTIVES", "SCHEMA_VERSION", "Objective",
    "ActorInfo", "ClusterState", "DeleteDeployment", "DeployModel", "DeployReply", "DeploymentList", "Deregister",
    "ErrorResult", "Frozen", "GetState", "Heartbeat", "Hop", "Hosts", "Id", "InferenceJob", "LinkReport", "HopReport", "HopStat", "DeploymentLatency",
    "LinkSpec", "LinkState", "ListDeployments", "LoadPart", "ModelVariant", "Message", "MessageError", "NDArray", "PartChunk",
    "PartRef", "PartRequest", "PlanTableMessage", "PoolManifest", "PowerSpec", "Probe", "ProbeReply", "Register",
    "Reply", "Requirements", "ResultMessage", "ServerState", "SetLinks", "TensorMessage", "UndeployModel",
    "UnloadPart", "WhoHosts",
    "check_tensor", "compress_array", "decode", "decompress_array", "encode", "pack_array", "plan_deployment_name", "split_pair", "unpack_array",
]
