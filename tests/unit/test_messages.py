"""The wire codec: round trips and every validation failure, in-process (no broker)."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest

from splitinfer import messages as M
from splitinfer.messages import (
    ALLOWED_DTYPES,
    ErrorResult,
    Heartbeat,
    Hop,
    InferenceJob,
    LoadPart,
    MessageError,
    PartChunk,
    PartRef,
    Register,
    ResultMessage,
    TensorMessage,
    check_tensor,
    decode,
    encode,
)


def _raw(body: dict) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _ext(dtype: str, shape: tuple, data: bytes) -> msgpack.ExtType:
    dt = dtype.encode()
    header = struct.pack(f"<B{len(dt)}sB{len(shape)}Q", len(dt), dt, len(shape), *shape)
    return msgpack.ExtType(M.NDARRAY_EXT, header + data)


def _tensor_body(array_ext, **over) -> dict:
    body = {"v": 1, "type": "tensor", "request_id": "r1", "deployment": "d", "tensor": "x:0", "array": array_ext}
    body.update(over)
    return body


def _fails(data: bytes, code: str, **kw) -> MessageError:
    with pytest.raises(MessageError) as info:
        decode(data, **kw)
    err = info.value
    assert err.code == code, (err.code, str(err))
    assert "\n" not in str(err) and str(err)
    return err


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_array_round_trip_every_allowed_dtype(dtype):
    rng = np.random.default_rng(0)
    arr = (rng.uniform(-5, 5, size=(2, 3, 4)) > 0 if dtype == "|b1"
           else rng.uniform(0, 100, size=(2, 3, 4)).astype(dtype))
    msg = decode(encode(TensorMessage(request_id="r", deployment="d", tensor="a/b.c:0", array=arr)))
    assert isinstance(msg, TensorMessage)
    assert msg.array.dtype == arr.dtype and msg.array.shape == arr.shape
    np.testing.assert_array_equal(msg.array, arr)


def test_zero_copy_decode_and_non_contiguous_encode():
    base = np.arange(64, dtype=np.float32).reshape(8, 8)
    view = base[:, ::2]  # not C-contiguous
    data = encode(TensorMessage(request_id="r", deployment="d", tensor="t", array=view))
    got = decode(data).array
    np.testing.assert_array_equal(got, view)
    assert not got.flags.writeable  # a view on the received buffer, not a copy
    assert not got.flags.owndata


def test_scalar_and_empty_arrays():
    for arr in (np.float32(3.5).reshape(()), np.zeros((0, 4), np.int64)):
        got = decode(encode(TensorMessage(request_id="r", deployment="d", tensor="t", array=np.asarray(arr)))).array
        assert got.shape == np.asarray(arr).shape
        np.testing.assert_array_equal(got, arr)


def test_every_message_type_round_trips():
    arr = np.ones((1, 3), np.float32)
    msgs = [
        InferenceJob(deployment="d", inputs={"x:0": arr}, deadline_s=2.0, reply_to="c1"),
        TensorMessage(request_id="r", deployment="d", tensor="x:0", array=arr, hops=[Hop(part="p0", server="s")]),
        ResultMessage(job_id="j", deployment="d", outputs={"y:0": arr}, hops=[Hop(part="p", server="s")],
                      latency_s=0.1, served_by=["s"], plan="p1", plan_deployment="d:p1"),
        ErrorResult(job_id="j", code="join_timeout", message="x", where="s"),
        Register(actor_id="s1", site="edge", parts=[PartRef(deployment="d", part="p", replica=1, replicas=2)]),
        Heartbeat(actor_id="s1", state=M.ServerState(power=M.PowerSpec(), memory_limit_mb=512.0, battery=0.5)),
        LoadPart(server_id="s1", deployment="d", part="p"),
        PartChunk(deployment="d", file="p.keras", index=0, count=1, size=3, sha256="0" * 64, data=b"abc"),
        M.WhoHosts(deployment="d"), M.Hosts(), M.PoolManifest(deployment="d", manifest="{}"),
        M.PartRequest(deployment="d", file="p.keras"), M.ListDeployments(), M.Reply(message="done"),
        M.DeploymentList(deployments=["d"], models=["m"]),
        M.Deregister(actor_id="a"), M.UnloadPart(server_id="s", deployment="d", part="p"),
        M.DeployModel(name="m", model="keras.applications:MobileNetV3Small", objective="energy", sla_s=0.05,
                      servers=["s1"], compression=True),
        M.PlanTableMessage(name="m", table={"plans": []}, cost_graph={"nodes": []}, origin="x"),
        M.DeleteDeployment(deployment="m"), M.UndeployModel(name="m"),
        M.DeployReply(name="m", table={"plans": []}, deployments={"p1": "m:p1"}, timings_s={"plan": 0.1}),
        # sites, links, monitors, state pool
        M.SetLinks(links={"a-b": M.LinkSpec(rtt_ms=1)}), M.Probe(probe_id="p", payload=b"x", reply_bytes=3),
        M.ProbeReply(probe_id="p"), M.GetState(), M.ClusterState(),
        M.LinkReport(link=M.LinkState(src_site="a", dst_site="b", rtt_ms=1.0)),
        M.HopReport(source="fe", hops=[M.HopStat(deployment="m:p0", part="part0", server="s", transfer_s=0.001,
                                                 compute_s=0.01, samples=5)],
                    latencies=[M.DeploymentLatency(deployment="m:p0", latency_s=0.02, samples=5, since=1.0)]),
    ]
    assert {m.TYPE for m in msgs} == set(M.MESSAGE_TYPES)
    for m in msgs:
        got = decode(encode(m))
        assert type(got) is type(m)
        for field in type(m).model_fields:
            a, b = getattr(m, field), getattr(got, field)
            if isinstance(a, dict) and a and isinstance(next(iter(a.values())), np.ndarray):
                assert a.keys() == b.keys()
                for k in a:
                    np.testing.assert_array_equal(a[k], b[k])
            elif isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b)
            else:
                assert a == b, (m.TYPE, field)


def test_expect_restricts_types():
    data = encode(M.Heartbeat(actor_id="a"))
    assert isinstance(decode(data, expect=Heartbeat), Heartbeat)
    _fails(data, "bad_type", expect=TensorMessage)


# ------------------------------------------------------------------------------------------ failures

def test_not_msgpack():
    _fails(b"\xc1\xc1\xc1", "bad_message")
    _fails(b"", "bad_message")
    _fails(_raw([1, 2, 3]), "bad_message")  # not a map
    _fails(_raw({"v": 1, "type": "heartbeat", "actor_id": "a"}) + b"trailing", "bad_message")


def test_size_limit():
    data = encode(TensorMessage(request_id="r", deployment="d", tensor="t", array=np.zeros(1000, np.float32)))
    err = _fails(data, "too_large", max_bytes=1000)
    assert "1000" in str(err)


def test_depth_limit():
    deep = {"x": 1}
    for _ in range(M.MAX_DEPTH + 2):
        deep = {"x": deep}
    _fails(_raw({"v": 1, "type": "reply", "data": deep, "job_id": "j9"}), "too_deep")


def test_version_and_type():
    _fails(_raw({"v": 2, "type": "heartbeat", "actor_id": "a"}), "bad_version")
    _fails(_raw({"type": "heartbeat", "actor_id": "a"}), "bad_version")
    _fails(_raw({"v": 1, "type": "pickle", "actor_id": "a"}), "bad_type")
    _fails(_raw({"v": 1, "actor_id": "a"}), "bad_type")


def test_pydantic_validation_extra_missing_and_wrong_types():
    _fails(_raw({"v": 1, "type": "heartbeat", "actor_id": "a", "surprise": 1}), "invalid")  # extra forbidden
    _fails(_raw({"v": 1, "type": "heartbeat"}), "invalid")  # missing
    _fails(_raw({"v": 1, "type": "load_part", "server_id": "s", "deployment": "d", "part": "p", "replica": -1}),
           "invalid")
    err = _fails(_raw(_tensor_body([1.0, 2.0])), "invalid")  # a list where an array must be
    assert err.job_id == "r1"  # recovered for the error result
    _fails(_raw({"v": 1, "type": "part_chunk", "deployment": "d", "file": "f", "index": 0, "count": 1,
                 "size": 1, "sha256": "not-a-hash", "data": b"x"}), "invalid")


@pytest.mark.parametrize("dtype", ["|O", "<U4", "|V8", ">f4", "<c8", "|S3", "<M8[s]", "weird"])
def test_disallowed_dtype(dtype):
    err = _fails(_raw(_tensor_body(_ext(dtype, (2,), b"\0" * 8))), "bad_dtype")
    assert err.job_id is None or err.job_id == "r1"


def test_disallowed_dtype_on_encode():
    with pytest.raises(ValueError):
        encode(TensorMessage(request_id="r", deployment="d", tensor="t", array=np.array(["a"])))
    with pytest.raises(ValueError):
        encode(TensorMessage(request_id="r", deployment="d", tensor="t", array=np.array([1 + 2j])))


def test_shape_times_itemsize_must_equal_bytes():
    err = _fails(_raw(_tensor_body(_ext("<f4", (2, 3), b"\0" * 20))), "bad_array")  # 24 needed
    assert "(2, 3)" in str(err) and "20" in str(err)
    _fails(_raw(_tensor_body(_ext("<f4", (2, 3), b"\0" * 28))), "bad_array")
    _fails(_raw(_tensor_body(_ext("<f4", (2 ** 40, 2 ** 30), b"\0" * 8))), "bad_array")  # huge claimed shape


def test_truncated_and_bad_array_headers():
    for payload in (b"", b"\x03", b"\x03<f", b"\x03<f4", b"\x03<f4\x02" + b"\0" * 8):
        _fails(_raw(_tensor_body(msgpack.ExtType(M.NDARRAY_EXT, payload))), "bad_array")
    _fails(_raw(_tensor_body(msgpack.ExtType(M.NDARRAY_EXT, b"\x03\xff\xfe\xfd\x00"))), "bad_array")
    too_many = struct.pack("<B3sB9Q", 3, b"<f4", 9, *([1] * 9)) + b"\0" * 4
    _fails(_raw(_tensor_body(msgpack.ExtType(M.NDARRAY_EXT, too_many))), "bad_array")


def test_unknown_ext_type():
    _fails(_raw(_tensor_body(msgpack.ExtType(42, b"xx"))), "bad_message")


def test_check_tensor_against_spec():
    a = np.zeros((1, 8, 8, 3), np.float32)
    check_tensor(a, [None, 8, 8, 3], "float32")
    with pytest.raises(MessageError) as e:
        check_tensor(a, [None, 16, 16, 3], "float32", "img:0", "r1")
    assert e.value.code == "wrong_shape" and e.value.job_id == "r1" and "(1, 8, 8, 3)" in str(e.value)
    with pytest.raises(MessageError) as e:
        check_tensor(a, [None, 8, 8], "float32")
    assert e.value.code == "wrong_shape"
    with pytest.raises(MessageError) as e:
        check_tensor(a, [None, 8, 8, 3], "int32")
    assert e.value.code == "wrong_dtype"


def test_no_pickle_in_codec():
    import inspect

    src = inspect.getsource(M)
    assert "import pickle" not in src and "allow_pickle=True" not in src
