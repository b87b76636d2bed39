"""Tensor frames: what the data plane carries, a fixed small header and the arrays' raw bytes. Pure.

Why not the msgpack envelope of `wire`: a tensor between two parts is the hot path. A frame is built and parsed with
`struct` and one msgpack call on a map of plain strings and numbers; no pydantic model is built per tensor, and the
arrays are read-only views on the received bytes (no copy).

Layout (little-endian):

    "SIF" version:u8 | kind:u8 | narrays:u8 | reserved:u16 | meta_len:u32 | meta (msgpack map) | payload

`kind` is TENSORS (inputs to a part, or a part's outputs to the next parts), RESULT (a job's final outputs,
published once to `<ns>.results`, where the caller, the front end and the result store all read it) or NOTICE (a
job its caller sent itself, for the front end to track: meta only). `meta["a"]`
describes the arrays in payload order: `[name, dtype str, shape, codec or None, scale or None]`; each array starts
at a multiple of ALIGN bytes. Checks on every decode: the magic and version, sizes within the limit, dtype in the
allow-list, at most MAX_NDIM dimensions, the arrays' bytes (shape x itemsize, aligned) adding up to the payload
exactly, the known meta fields of the right types, ids no longer than MAX_ID_LEN.

Deadlines travel as a budget (seconds left when sent), never as a wall-clock time another machine would have to
agree with; each receiver turns it into a deadline on its own clock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any

import msgpack
import numpy as np

from splitinfer.messages.arrays import ALLOWED_DTYPES, CODECS, MAX_NDIM, MessageError, decompress_array
from splitinfer.messages.data import Hop, ResultMessage
from splitinfer.messages.wire import DEFAULT_MAX_BYTES, MAX_ID_LEN

MAGIC = b"SIF"
FRAME_VERSION = 1
TENSORS = 1
RESULT = 2
NOTICE = 3  # a job sent by its caller: the meta alone, for the front end to track (no arrays)
ALIGN = 16
_HEAD = struct.Struct("<3sBBBHI")  # magic, version, kind, narrays, reserved, meta_len
MAX_META_BYTES = 1 << 20
MAX_ARRAYS = 255

# hops that are a trip, not a part's work: the job to the front end, the answer to its caller
TRIP_HOPS = ("job", "answer")
# one hop as the frames carry it: part, server, transfer, join wait, queue wait, compute, batch, finished at, via
HOP_FIELDS = ("part", "server", "transfer_s", "join_wait_s", "queue_wait_s", "compute_s", "batch", "finished_at",
              "via")

# meta fields a part's outputs carry on from its inputs: whose job it is and where its answer and errors go
CARRIED = ("job", "model", "plan", "rt", "err", "sub", "origin")

# meta keys: name -> (type checked on decode, required)
_META: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "rid": (str, True),        # request id: one attempt of one job
    "job": (str, False),       # the job id (answers are matched by it)
    "dep": (str, True),        # the deployment the arrays belong to (a plan's deployment for a model)
    "model": (str, False),     # the deployment the job named (a model deployment, when it differs from dep)
    "plan": (str, False),      # the plan that runs, for a model deployment
    "src": (str, False),       # producing part ("" for the job's inputs)
    "srv": (str, False),       # producing actor
    "site": (str, False),      # producer's site (link emulation)
    "origin": (str, False),    # the caller's site: where the answer goes back to (link emulation)
    "budget": ((int, float), False),  # seconds left to the job's deadline when sent
    "rt": (str, False),        # where the answer goes: routing key on `<ns>.results`
    "err": (str, False),       # where errors about this request go (the front end)
    "sent": ((int, float), False),    # producer's wall clock at send (hop transfer times)
    "hops": (list, False),     # hops so far, each a list in HOP_FIELDS order
    "sub": ((int, float), False),     # the job's submission time on its submitter's clock
}


def is_frame(body: bytes | memoryview) -> bool:
    return bytes(body[:3]) == MAGIC


@dataclass(slots=True)
class Frame:
    """One frame: its kind, its meta fields and its arrays (name -> array, in meta order)."""

    kind: int
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    codecs: dict[str, tuple[str, float | None]] = field(default_factory=dict)  # compressed arrays only

    @property
    def request_id(self) -> str:
        return self.meta["rid"]

    @property
    def deployment(self) -> str:
        return self.meta["dep"]

    @property
    def job_id(self) -> str:
        return self.meta.get("job") or self.meta["rid"]

    @property
    def hops(self) -> list[list]:
        return self.meta.get("hops") or []


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def encode_frame(kind: int, meta: dict[str, Any], arrays: dict[str, np.ndarray],
                 codecs: dict[str, tuple[str, float | None]] | None = None) -> bytes:
    """A frame's bytes. `arrays` must be allowed dtypes; C-contiguous copies are made only where needed."""
    if len(arrays) > MAX_ARRAYS:
        raise MessageError(f"a frame carries at most {MAX_ARRAYS} arrays, not {len(arrays)}", "too_many_arrays")
    codecs = codecs or {}
    table, chunks, size = [], [], 0
    for name, arr in arrays.items():
        if not isinstance(arr, np.ndarray):
            arr = np.asarray(arr)
        dt = arr.dtype.str
        if dt not in ALLOWED_DTYPES:
            raise MessageError(f"{name}: dtype {dt} is not allowed", "bad_dtype")
        if arr.ndim > MAX_NDIM:
            raise MessageError(f"{name}: {arr.ndim} dimensions, at most {MAX_NDIM}", "bad_array")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        codec, scale = codecs.get(name, (None, None))
        table.append([name, dt, list(arr.shape), codec, scale])
        raw = arr.data.cast("B") if arr.ndim and arr.size else memoryview(arr.tobytes())
        chunks.append(raw)
        pad = _padded(raw.nbytes) - raw.nbytes
        if pad:
            chunks.append(b"\0" * pad)
        size += raw.nbytes + pad
    meta = dict(meta)
    meta["a"] = table
    packed = msgpack.packb(meta, use_bin_type=True)
    if len(packed) > MAX_META_BYTES:
        raise MessageError(f"frame meta of {len(packed)} bytes exceeds {MAX_META_BYTES}", "too_large")
    head = _HEAD.pack(MAGIC, FRAME_VERSION, kind, len(table), 0, len(packed))
    start = len(head) + len(packed)
    pad = _padded(start) - start  # the first array starts aligned too
    return b"".join([head, packed, b"\0" * pad, *chunks])


def decode_frame(body: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> Frame:
    """Bytes -> a checked Frame, or MessageError with a one-line reason (and the request id when readable)."""
    n = len(body)
    if n > max_bytes:
        raise MessageError(f"frame of {n} bytes exceeds the limit of {max_bytes}", "too_large")
    if n < _HEAD.size:
        raise MessageError("frame header truncated", "bad_frame")
    view = memoryview(body)
    magic, version, kind, narrays, _, meta_len = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise MessageError("not a tensor frame", "bad_frame")
    if version != FRAME_VERSION:
        raise MessageError(f"frame version {version}, expected {FRAME_VERSION}", "bad_version")
    if kind not in (TENSORS, RESULT, NOTICE):
        raise MessageError(f"unknown frame kind {kind}", "bad_frame")
    if meta_len > MAX_META_BYTES or _HEAD.size + meta_len > n:
        raise MessageError("frame meta truncated or too large", "bad_frame")
    try:
        meta = msgpack.unpackb(view[_HEAD.size:_HEAD.size + meta_len], raw=False, strict_map_key=True,
                               max_bin_len=0, max_ext_len=0, max_str_len=64 * 1024, max_array_len=100_000,
                               max_map_len=1000)
    except Exception as exc:
        raise MessageError(f"frame meta is not valid msgpack: {type(exc).__name__}", "bad_frame") from None
    if not isinstance(meta, dict):
        raise MessageError("frame meta is not a map", "bad_frame")
    rid = meta.get("rid")
    rid = rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LEN else None
    for key, (kind_of, required) in _META.items():
        value = meta.get(key)
        if value is None:
            if required:
                raise MessageError(f"frame meta lacks {key!r}", "bad_frame", rid)
            continue
        if not isinstance(value, kind_of) or isinstance(value, bool):
            raise MessageError(f"frame meta {key!r} has the wrong type", "bad_frame", rid)
        if isinstance(value, str) and len(value) > MAX_ID_LEN:
            raise MessageError(f"frame meta {key!r} is longer than {MAX_ID_LEN}", "bad_frame", rid)
    if not meta["rid"] or not meta["dep"]:
        raise MessageError("frame meta has an empty request id or deployment", "bad_frame", rid)
    table = meta.pop("a", None)
    if not isinstance(table, list) or len(table) != narrays:
        raise MessageError("frame array table does not match its header", "bad_frame", rid)
    offset = _padded(_HEAD.size + meta_len)
    arrays: dict[str, np.ndarray] = {}
    codecs: dict[str, tuple[str, float | None]] = {}
    for entry in table:
        if not (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[0], str) and entry[0]
                and isinstance(entry[1], str) and isinstance(entry[2], list)):
            raise MessageError("frame array entry is malformed", "bad_frame", rid)
        name, dt, shape, codec, scale = entry
        if dt not in ALLOWED_DTYPES:
            raise MessageError(f"{name}: dtype {dt!r} is not allowed", "bad_dtype", rid)
        if len(shape) > MAX_NDIM or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise MessageError(f"{name}: shape {shape!r} is not a list of at most {MAX_NDIM} sizes", "bad_array", rid)
        if codec is not None and codec not in CODECS:
            raise MessageError(f"{name}: unknown codec {codec!r}", "bad_codec", rid)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise MessageError(f"{name}: scale {scale!r} is not a number", "bad_codec", rid)
        if name in arrays:
            raise MessageError(f"{name}: twice in one frame", "bad_frame", rid)
        dtype = np.dtype(dt)
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dtype.itemsize
        if offset + nbytes > n:
            raise MessageError(f"{name}: shape {tuple(shape)} x itemsize {dtype.itemsize} = {nbytes} bytes, beyond "
                               f"the {max(0, n - offset)} bytes sent", "bad_array", rid)
        arrays[name] = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
        if codec is not None:
            codecs[name] = (codec, None if scale is None else float(scale))
        offset += _padded(nbytes)
    if offset > n:
        raise MessageError(f"frame ends {offset - n} bytes before its last array's padding", "bad_array", rid)
    if offset < n:
        raise MessageError(f"frame carries {n - offset} bytes more than its arrays", "bad_array", rid)
    return Frame(kind, meta, arrays, codecs)


_FINISHED = HOP_FIELDS.index("finished_at")


def unique_hops(hop_lists: Iterable[Iterable[list]]) -> list[list]:
    """One job's hops gathered from several frames (the branches of a DAG carry the hops they share), each once
    (by part, server and finish time), in the order they finished."""
    def finished(h) -> float:
        return h[_FINISHED] if len(h) > _FINISHED else 0.0

    seen: dict[tuple, list] = {}
    for hops in hop_lists:
        for h in hops:
            seen.setdefault((h[0], h[1], finished(h)), h)
    return sorted(seen.values(), key=finished)


def hop_models(hops: list[list]) -> list[Hop]:
    """The hops a frame carries as the Hop models a ResultMessage shows (unknown or short entries are skipped)."""
    out = []
    for h in hops:
        if isinstance(h, list) and len(h) >= 8:
            out.append(Hop(part=str(h[0]), server=str(h[1]), transfer_s=float(h[2]), join_wait_s=float(h[3]),
                           queue_wait_s=float(h[4]), compute_s=float(h[5]), batch=int(h[6]), finished_at=float(h[7]),
                           via=str(h[8]) if len(h) > 8 else "broker"))
    return out


def result_message(frame: Frame, dtypes: dict[str, str] | None = None, latency_s: float | None = None
                   ) -> ResultMessage:
    """A RESULT frame as the ResultMessage the caller gets: compressed outputs restored to their dtypes (from the
    manifest: `dtypes`, else float32), the hops as models, the servers that worked on it in order."""
    outputs = {}
    for name, array in frame.arrays.items():
        codec = frame.codecs.get(name)
        outputs[name] = decompress_array(array, codec[0], codec[1], (dtypes or {}).get(name, "float32")) \
            if codec else array
    hops = hop_models(frame.hops)
    served = list(dict.fromkeys(h.server for h in hops if h.part not in TRIP_HOPS))
    meta = frame.meta
    return ResultMessage(job_id=frame.job_id, deployment=meta.get("model") or frame.deployment, outputs=outputs,
                         hops=hops, latency_s=latency_s, served_by=served, plan=meta.get("plan"),
                         plan_deployment=frame.deployment if meta.get("plan") else None)
