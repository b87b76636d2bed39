"""The envelope every control and job message shares: a pydantic type with a schema version, msgpack on the wire.

Every message is one msgpack map ``{"v": SCHEMA_VERSION, "type": ..., ...}``; `encode(msg)` gives bytes, `decode(data)`
the typed message or a `MessageError` with a one-line reason (``err.code`` a short machine code, ``err.job_id`` the
request/job id when one could be recovered). A subclass with a `TYPE` is registered for decoding by defining it.

Checks on every decode: total size <= max_bytes, nesting depth <= MAX_DEPTH, schema version, message type, and the
pydantic model of that type (extra fields forbidden); arrays are checked by `arrays.unpack_array`. No pickle, no
eval, no object dtypes. Messages are immutable: a changed copy is `msg.model_copy(update=...)`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splitinfer.messages.arrays import NDARRAY_EXT, MessageError, pack_array, unpack_array

SCHEMA_VERSION = 1
MAX_DEPTH = 16
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_ID_LEN = 256

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)]

MESSAGE_TYPES: dict[str, type["Message"]] = {}


class Message(BaseModel):
    """Base of every wire message. `TYPE` names the class on the wire; `v` is the schema version."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)
    TYPE: ClassVar[str] = ""
    v: int = SCHEMA_VERSION

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.TYPE:
            if cls.TYPE in MESSAGE_TYPES and MESSAGE_TYPES[cls.TYPE] is not cls:
                raise TypeError(f"message type {cls.TYPE!r} defined twice")
            MESSAGE_TYPES[cls.TYPE] = cls


class Frozen(BaseModel):
    """A nested value of a message: immutable, extra fields forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="python")
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _prepare(obj: Any) -> Any:
    """Arrays -> ExtType up front (msgpack's `default` path is ~30x slower on a large ndarray)."""
    if isinstance(obj, np.ndarray):
        return pack_array(obj)
    if isinstance(obj, dict):
        return {k: _prepare(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_prepare(v) for v in obj]
    return obj


def encode(msg: Message) -> bytes:
    """The message as msgpack bytes (arrays as ext type)."""
    if not isinstance(msg, Message) or not msg.TYPE:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    body = _prepare(msg.model_dump(mode="python"))
    body["v"] = SCHEMA_VERSION
    body["type"] = msg.TYPE
    return msgpack.packb(body, default=_default, use_bin_type=True)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == NDARRAY_EXT:
        return unpack_array(data)
    raise MessageError(f"unknown msgpack ext type {code}", "bad_message")


def depth(obj: Any, limit: int) -> int:
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


def recover_id(obj: Any) -> str | None:
    """The job or request id of an undecodable message, when it has one: its error result can then be matched."""
    if isinstance(obj, dict):
        for key in ("job_id", "request_id"):
            v = obj.get(key)
            if isinstance(v, str) and 0 < len(v) <= MAX_ID_LEN:
                return v
    return None


def unpack_map(data: bytes | bytearray | memoryview, max_bytes: int) -> dict:
    """msgpack bytes -> a map (arrays decoded and checked), within the size and depth limits; else MessageError."""
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
    if depth(obj, MAX_DEPTH) > MAX_DEPTH:
        raise MessageError(f"message nests deeper than {MAX_DEPTH} levels", "too_deep", recover_id(obj))
    return obj


def decode(data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES,
           expect: type[Message] | tuple[type[Message], ...] | None = None) -> Message:
    """Bytes -> a validated message, or MessageError. `expect` restricts the accepted types."""
    obj = unpack_map(data, max_bytes)
    job_id = recover_id(obj)
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
