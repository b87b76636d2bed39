"""Tensor frames, the data plane's wire: exact round trips, zero-copy views, and every malformed frame refused with
a one-line reason (never an exception of another kind)."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest

from splitinfer.messages import ALLOWED_DTYPES, MessageError
from splitinfer.messages.frames import ALIGN, MAGIC, RESULT, TENSORS, decode_frame, encode_frame, is_frame


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv/x:0": rng.standard_normal((2, 7, 7, 3)).astype(np.float32),
        "ids:0": rng.integers(-5, 5, size=(2, 3)).astype(np.int64),
        "half:0": rng.standard_normal((1, 5)).astype(np.float16),
        "flag:0": np.array(True),
        "empty:0": np.zeros((0, 4), np.uint8),
        "strided:0": rng.standard_normal((4, 6)).astype(np.float64)[:, ::2],  # not C-contiguous
    }


def test_every_allowed_dtype_and_shape_round_trips_exactly_as_read_only_views():
    arrays = _arrays()
    for dt in sorted(ALLOWED_DTYPES):
        arrays[f"dt{dt}"] = (np.arange(6) % 2).astype(np.dtype(dt)).reshape(2, 3)
    meta = {"rid": "r-1", "job": "j", "dep": "d:p0", "hops": [["p0", "s1", 0.1, 0.0, 0.0, 0.002, 4, 1.5, "broker"]],
            "budget": 2.5, "rt": "client-1"}
    body = encode_frame(TENSORS, meta, arrays, codecs={"half:0": ("float16", None)})
    assert is_frame(body) and body[:3] == MAGIC
    frame = decode_frame(body)
    assert frame.kind == TENSORS and frame.request_id == "r-1" and frame.job_id == "j" and frame.deployment == "d:p0"
    assert frame.meta["budget"] == 2.5 and frame.hops == meta["hops"]
    assert frame.codecs == {"half:0": ("float16", None)}
    assert list(frame.arrays) == list(arrays)
    for name, want in arrays.items():
        got = frame.arrays[name]
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name
        assert not got.flags.writeable  # a view on the received bytes
        if got.size and got.ndim:
            assert got.ctypes.data % ALIGN == (np.frombuffer(body, np.uint8).ctypes.data % ALIGN)


def test_a_result_frame_carries_several_outputs_and_no_arrays_is_legal():
    out = decode_frame(encode_frame(RESULT, {"rid": "r", "dep": "d"}, {"a:0": np.ones(3, np.float32),
                                                                     "b:0": np.zeros((1, 2), np.int32)}))
    assert out.kind == RESULT and sorted(out.arrays) == ["a:0", "b:0"]
    assert decode_frame(encode_frame(TENSORS, {"rid": "r", "dep": "d"}, {})).arrays == {}


def _frame_with(meta: dict, payload: bytes = b"", narrays: int | None = None, version: int = 1, kind: int = 1) -> bytes:
    packed = msgpack.packb(meta, use_bin_type=True)
    head = struct.pack("<3sBBBHI", MAGIC, version, kind, len(meta.get("a", [])) if narrays is None else narrays, 0,
                       len(packed))
    pad = -(len(head) + len(packed)) % ALIGN
    return head + packed + b"\0" * pad + payload


GOOD = {"rid": "r", "dep": "d", "a": [["x:0", "<f4", [2], None, None]]}
BAD = [
    (b"", "truncated"),
    (b"SIF", "truncated"),
    (b"XYZ" + bytes(20), "not a tensor frame"),
    (_frame_with(GOOD, bytes(16), version=9), "version"),
    (_frame_with(GOOD, bytes(16), kind=7), "kind"),
    (_frame_with(GOOD, bytes(4)), "bytes, beyond"),                       # shape x itemsize > payload
    (_frame_with(GOOD, bytes(8)), "padding"),                             # the data, but not its padding
    (_frame_with(GOOD, bytes(32)), "more than its arrays"),              # payload > arrays
    (_frame_with({**GOOD, "a": [["x:0", "|O", [2], None, None]]}, bytes(16)), "not allowed"),
    (_frame_with({**GOOD, "a": [["x:0", ">f4", [2], None, None]]}, bytes(16)), "not allowed"),
    (_frame_with({**GOOD, "a": [["x:0", "<f4", [-1], None, None]]}, bytes(16)), "shape"),
    (_frame_with({**GOOD, "a": [["x:0", "<f4", [1] * 9, None, None]]}, bytes(16)), "shape"),
    (_frame_with({**GOOD, "a": [["x:0", "<f4", [True], None, None]]}, bytes(16)), "shape"),
    (_frame_with({**GOOD, "a": [["x:0", "<f4", [2], "zip", None]]}, bytes(16)), "codec"),
    (_frame_with({**GOOD, "a": [["x:0", "<f4", [2], "int8", "big"]]}, bytes(16)), "scale"),
    (_frame_with({**GOOD, "a": [["x:0", "<f4", [2]]]}, bytes(16)), "malformed"),
    (_frame_with({**GOOD, "a": [["x:0", "<f4", [2], None, None]] * 2}, bytes(32)), "twice"),
    (_frame_with(GOOD, bytes(16), narrays=2), "does not match"),
    (_frame_with({"dep": "d", "a": []}), "lacks 'rid'"),
    (_frame_with({"rid": "r", "dep": "d", "budget": "soon", "a": []}), "wrong type"),
    (_frame_with({"rid": "r", "dep": "d", "rt": "x" * 300, "a": []}), "longer than"),
    (_frame_with({"rid": "", "dep": "d", "a": []}), "empty"),
    (MAGIC + bytes([1, 1, 0, 0, 0]) + struct.pack("<I", 1 << 30), "meta truncated"),
    (MAGIC + bytes([1, 1, 0, 0, 0]) + struct.pack("<I", 3) + b"\xc1\xc1\xc1", "not valid msgpack"),
    (MAGIC + bytes([1, 1, 0, 0, 0]) + struct.pack("<I", 1) + b"\x01", "not a map"),
]


@pytest.mark.parametrize("body, reason", BAD)
def test_malformed_frames_are_refused_with_a_reason(body, reason):
    with pytest.raises(MessageError) as err:
        decode_frame(body)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_size_limit_and_bad_arrays_refused_on_encode_and_decode():
    body = encode_frame(TENSORS, {"rid": "r", "dep": "d"}, {"x": np.zeros(1000, np.float32)})
    with pytest.raises(MessageError, match="exceeds the limit"):
        decode_frame(body, max_bytes=1000)
    with pytest.raises(MessageError, match="not allowed"):
        encode_frame(TENSORS, {"rid": "r", "dep": "d"}, {"x": np.array(["a"], dtype=object)})
    bad = _frame_with({"rid": "r-7", "dep": "d", "a": [["x:0", "<f4", [4], None, None]]}, bytes(8))
    with pytest.raises(MessageError) as err:
        decode_frame(bad)
    assert err.value.job_id == "r-7"  # the error result can still be matched to its request


def test_fuzzed_frames_never_raise_anything_but_message_error():
    rng = np.random.default_rng(1)
    good = encode_frame(TENSORS, {"rid": "r", "dep": "d", "hops": [["p", "s", 0, 0, 0, 0, 1, 0, "broker"]]},
                        {"x:0": np.ones((2, 3), np.float32), "y:0": np.arange(4)})
    for _ in range(3000):
        body = bytearray(good)
        for _ in range(int(rng.integers(1, 6))):
            body[int(rng.integers(0, len(body)))] = int(rng.integers(0, 256))
        cut = int(rng.integers(0, len(body) + 1))
        try:
            decode_frame(bytes(body[:cut]))
        except MessageError:
            pass


def test_a_jobs_hops_from_several_branches_count_once_each_in_the_order_they_finished():
    from splitinfer.messages.frames import unique_hops

    first = ["p0", "s1", 0.001, 0.0, 0.0, 0.002, 1, 10.0, "broker"]
    left = ["p1", "s2", 0.001, 0.0, 0.0, 0.003, 1, 10.5, "broker"]
    right = ["p2", "s3", 0.001, 0.0, 0.0, 0.001, 1, 10.2, "broker"]
    again = ["p0", "s1", 0.001, 0.0, 0.0, 0.002, 1, 11.0, "broker"]  # a later attempt ran p0 again
    assert unique_hops([[first, left], [first, right], [again]]) == [first, right, left, again]
    assert unique_hops([]) == []
