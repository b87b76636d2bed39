"""Arrays on the wire and their checks: the dtype allow-list, the msgpack ext type, the float16/int8 codecs.

An array travels as msgpack ext type `NDARRAY_EXT` whose payload is
``u8 len(dtype) | dtype str (numpy .str, e.g. "<f4") | u8 ndim | ndim x u64 little-endian dims | raw C-order bytes``
and decodes with `np.frombuffer` straight on the payload (no copy; the arrays are read-only). Checks: dtype in the
allow-list, ndim <= MAX_NDIM, prod(shape) x itemsize == number of bytes.

A tensor may travel compressed: float16, or int8 with a per-tensor `scale`; `compress_array` / `decompress_array`
convert, and a receiver restores the manifest dtype before `check_tensor`.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any

import msgpack
import numpy as np
from pydantic import PlainSerializer, WithJsonSchema
from pydantic.functional_validators import PlainValidator

NDARRAY_EXT = 1
MAX_NDIM = 8

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


def check_tensor(arr: np.ndarray, shape: list[int | None] | tuple, dtype: str, name: str = "tensor",
                 job_id: str | None = None) -> None:
    """A tensor against its manifest spec: same dtype, same rank, equal fixed dims (None matches any)."""
    want = np.dtype(dtype)
    if arr.dtype != want:
        raise MessageError(f"{name}: dtype {arr.dtype.name}, expected {want.name}", "wrong_dtype", job_id)
    if arr.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape, arr.shape)):
        spec = tuple(shape)
        raise MessageError(f"{name}: shape {tuple(arr.shape)}, expected {spec}", "wrong_shape", job_id)
