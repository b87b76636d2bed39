"""Compressed tensors: the float16 / int8 codec in messages, and measuring what compressing a cut costs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from splitinfer.messages import (
    CODECS,
    MessageError,
    TensorMessage,
    check_tensor,
    compress_array,
    decode,
    decompress_array,
    encode,
)


def _refused(fn, *args) -> MessageError:
    with pytest.raises(MessageError) as info:
        fn(*args)
    assert info.value.code == "bad_codec", (info.value.code, str(info.value))
    assert "\n" not in str(info.value) and str(info.value)
    return info.value


# ------------------------------------------------------------------------------------------ codec round trips

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_int8_round_trip_error_is_at_most_half_a_step(dtype):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((2, 7, 5, 3)) * 3.0).astype(dtype)
    q, scale = compress_array(arr, "int8")
    assert q.dtype == np.int8 and q.shape == arr.shape
    assert scale == pytest.approx(float(np.max(np.abs(arr))) / 127)
    assert int(np.max(np.abs(q.astype(np.int16)))) == 127
    back = decompress_array(q, "int8", scale, dtype)
    assert back.dtype == np.dtype(dtype) and back.shape == arr.shape
    assert float(np.max(np.abs(back.astype(np.float64) - arr))) <= scale / 2 * (1 + 1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float16_round_trip_relative_error(dtype):
    rng = np.random.default_rng(2)
    arr = (rng.standard_normal((4, 33)) * 10.0).astype(dtype)
    half, scale = compress_array(arr, "float16")
    assert half.dtype == np.float16 and scale is None
    back = decompress_array(half, "float16", None, np.dtype(dtype).str)  # "<f4" as in a manifest works too
    assert back.dtype == np.dtype(dtype)
    rel = np.abs(back.astype(np.float64) - arr) / np.maximum(np.abs(arr), 1e-3)
    assert float(np.max(rel)) <= 2 ** -11 * 1.01  # float16 keeps 11 significant bits: ~4.9e-4
    assert float(np.max(rel)) > 0


def test_zeros_and_negative_values():
    zeros = np.zeros((3, 4), np.float32)
    q, scale = compress_array(zeros, "int8")
    assert scale == 1.0 and not q.any()
    assert np.array_equal(decompress_array(q, "int8", scale, "float32"), zeros)
    half, _ = compress_array(zeros, "float16")
    assert np.array_equal(decompress_array(half, "float16", None, "float32"), zeros)

    neg = -np.linspace(0.5, 8.0, 16, dtype=np.float32).reshape(4, 4)
    q, scale = compress_array(neg, "int8")
    assert scale == pytest.approx(8.0 / 127)
    assert q.min() == -127 and q.max() < 0
    back = decompress_array(q, "int8", scale, "float32")
    assert np.all(back < 0) and float(np.max(np.abs(back - neg))) <= scale / 2 * (1 + 1e-5)

    mixed = np.array([-4.0, -1.0, 0.0, 3.0], np.float32)  # symmetric: the scale follows the largest magnitude
    q, scale = compress_array(mixed, "int8")
    assert scale == pytest.approx(4.0 / 127) and q.tolist() == [-127, -32, 0, 95]


def test_empty_and_zero_d_arrays():
    for arr in (np.zeros((0, 4), np.float32), np.array(2.5, np.float32)):
        for codec in CODECS:
            packed, scale = compress_array(arr, codec)
            back = decompress_array(packed, codec, scale, "float32")
            assert back.shape == arr.shape and np.allclose(back, arr, atol=0.02)


def test_refusals():
    arr = np.ones((2, 2), np.float32)
    _refused(compress_array, arr, "bfloat16")
    _refused(compress_array, arr, None)
    _refused(compress_array, np.ones((2, 2), np.int32), "int8")
    _refused(compress_array, np.ones((2, 2), np.int32), "float16")
    _refused(compress_array, np.ones(2, bool), "float16")
    _refused(compress_array, [1.0, 2.0], "float16")
    _refused(compress_array, np.array([1.0, np.nan], np.float32), "int8")
    _refused(compress_array, np.array([1.0, np.inf], np.float32), "int8")

    half, _ = compress_array(arr, "float16")
    q, scale = compress_array(arr, "int8")
    _refused(decompress_array, q, "zstd", scale, "float32")
    _refused(decompress_array, q, "float16", None, "float32")          # int8 payload claimed as float16
    _refused(decompress_array, half, "int8", scale, "float32")         # float16 payload claimed as int8
    _refused(decompress_array, arr, "float16", None, "float32")        # not compressed at all
    _refused(decompress_array, q, "int8", 0.0, "float32")
    _refused(decompress_array, q, "int8", -0.5, "float32")
    _refused(decompress_array, q, "int8", float("nan"), "float32")
    _refused(decompress_array, q, "int8", float("inf"), "float32")
    _refused(decompress_array, q, "int8", None, "float32")
    _refused(decompress_array, q, "int8", "0.1", "float32")
    _refused(decompress_array, q, "int8", scale, "int32")              # the target must be a float dtype
    _refused(decompress_array, q, "int8", scale, "no-such-dtype")


def test_float16_keeps_nan_but_not_huge_values():
    """float16 is a plain cast: NaN stays NaN, and beyond 65504 becomes inf (the fidelity profile shows that)."""
    half, _ = compress_array(np.array([np.nan, 1e5], np.float32), "float16")
    back = decompress_array(half, "float16", None, "float32")
    assert np.isnan(back[0]) and np.isinf(back[1])


def test_tensor_message_with_codec_encodes_and_decodes():
    rng = np.random.default_rng(3)
    arr = rng.standard_normal((1, 6, 6, 8)).astype(np.float32)
    q, scale = compress_array(arr, "int8")
    msg = TensorMessage(request_id="r1", deployment="d", tensor="conv:0", array=q, codec="int8", scale=scale)
    data = encode(msg)
    assert len(data) < arr.nbytes / 2
    got = decode(data, expect=TensorMessage)
    assert got.codec == "int8" and got.scale == scale and got.array.dtype == np.int8
    back = decompress_array(got.array, got.codec, got.scale, "float32")
    check_tensor(back, [None, 6, 6, 8], "float32", "conv:0")
    assert float(np.max(np.abs(back - arr))) <= scale / 2 * (1 + 1e-5)

    half, _ = compress_array(arr, "float16")
    got = decode(encode(TensorMessage(request_id="r2", deployment="d", tensor="conv:0", array=half, codec="float16")))
    assert got.codec == "float16" and got.scale is None
    check_tensor(decompress_array(got.array, got.codec, got.scale, "<f4"), [None, 6, 6, 8], "float32")

    plain = decode(encode(TensorMessage(request_id="r3", deployment="d", tensor="conv:0", array=arr)))
    assert plain.codec is None and plain.scale is None  # optional: old senders are still understood

    bad = encode(TensorMessage(request_id="r4", deployment="d", tensor="conv:0", array=arr))
    import msgpack

    body = msgpack.unpackb(bad, raw=False, ext_hook=lambda c, d: msgpack.ExtType(c, d))
    body["codec"] = "zstd"
    with pytest.raises(MessageError) as info:
        decode(msgpack.packb(body, use_bin_type=True))
    assert info.value.code == "invalid" and "codec" in str(info.value)


def test_manifest_part_output_codec_is_optional():
    from splitinfer.splitter.manifest import PartOutput

    out = PartOutput(name="conv:0", shape=[None, 4], dtype="float32")
    assert out.codec is None
    again = PartOutput.model_validate_json(out.model_copy(update={"codec": "int8"}).model_dump_json())
    assert again.codec == "int8"


# ------------------------------------------------------------------------------------------ measuring fidelity

@pytest.fixture(scope="module")
def nested_graph():
    from splitinfer.splitter import ModelGraph
    from tests.support.splitter_models import nested_backbone

    return ModelGraph(nested_backbone())


@pytest.fixture(scope="module")
def nested_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fidelity-cache")


@pytest.fixture(scope="module")
def nested_measured(nested_graph, nested_cache):
    from splitinfer.monitor import measure_compression

    seen: list[str] = []
    return measure_compression(nested_graph, cache_dir=nested_cache, progress=seen.append), seen


@pytest.fixture(scope="module")
def nested_profile(nested_measured):
    return nested_measured[0]


def test_every_float_cut_point_and_codec_is_measured(nested_graph, nested_measured):
    nested_profile, progress = nested_measured
    points = [t for t in nested_graph.cut_points() if np.dtype(nested_graph.tensors[t].dtype).kind == "f"]
    assert len(points) >= 5
    assert nested_profile.tensors == points
    assert {(e.tensor, e.codec) for e in nested_profile.entries} == {(t, c) for t in points for c in CODECS}
    assert nested_profile.model == "nested" and nested_profile.input_shapes == [[16, 16, 3]]
    assert nested_profile.samples == 8 and nested_profile.batch == 1
    assert nested_profile.top1_output == "head/h_dense2:0" and not nested_profile.top1_by_error
    assert nested_profile.output_spread > 0  # the outputs depend on the input: the comparison means something
    assert len(progress) == len(points)  # once per tensor, naming it
    assert all(f" {t} " in line for t, line in zip(points, progress))


def test_float16_is_more_faithful_than_int8(nested_profile):
    by = {(e.tensor, e.codec): e for e in nested_profile.entries}
    f16 = [by[t, "float16"].max_abs_error for t in nested_profile.tensors]
    i8 = [by[t, "int8"].max_abs_error for t in nested_profile.tensors]
    assert np.mean(f16) < np.mean(i8)
    assert all(0 < e < 0.1 for e in f16 + i8)
    for e in nested_profile.entries:
        assert 0.0 <= e.top1_agreement <= 1.0
        assert e.bytes_saved_fraction == (0.5 if e.codec == "float16" else 0.75)
        assert 0 < e.cut_error < (1e-3 if e.codec == "float16" else 1e-2)


def test_fidelity_table_is_the_planners_compression(nested_profile):
    table = nested_profile.fidelity_table()
    assert list(table) == nested_profile.tensors
    for codecs in table.values():
        assert set(codecs) == set(CODECS)
        assert all(1e-6 <= f <= 1.0 for f in codecs.values())
    by_error = nested_profile.fidelity_table("max_abs_error")
    assert all(0 < f < 1 for c in by_error.values() for f in c.values())
    with pytest.raises(ValueError):
        nested_profile.fidelity_table("psnr")

    zero = nested_profile.model_copy(
        update={"entries": [e.model_copy(update={"top1_agreement": 0.0}) for e in nested_profile.entries]})
    assert all(f == 1e-6 for c in zero.fidelity_table().values() for f in c.values())


def test_json_round_trip(nested_profile):
    from splitinfer.monitor import CompressionProfile

    text = nested_profile.to_json()
    assert CompressionProfile.from_json(text) == nested_profile
    data = json.loads(text)
    data["format"] = "splitinfer.profile"
    with pytest.raises(ValueError):
        CompressionProfile.from_json(json.dumps(data))
    worst = nested_profile.model_copy(
        update={"entries": [nested_profile.entries[0].model_copy(update={"max_abs_error": float("inf")})]})
    again = CompressionProfile.from_json(worst.to_json())  # an unbounded error survives the file
    assert again.entries[0].max_abs_error == float("inf")
    assert again.fidelity_table("max_abs_error")[again.entries[0].tensor][again.entries[0].codec] == 1e-6


def test_second_call_comes_from_the_cache(nested_graph, nested_profile, nested_cache, monkeypatch):
    from splitinfer.monitor import fidelity, measure_compression

    files = list(nested_cache.rglob("*.json"))
    assert len(files) == 1 and "fidelity" in files[0].name

    def no_measuring(*a, **k):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(fidelity, "compression_entries", no_measuring)
    again = measure_compression(nested_graph, cache_dir=nested_cache)
    assert again == nested_profile
    # the key: other samples, seed, codecs or tensors are other files
    with pytest.raises(AssertionError):
        measure_compression(nested_graph, cache_dir=nested_cache, samples=2)
    with pytest.raises(AssertionError):
        measure_compression(nested_graph, cache_dir=nested_cache, seed=1)
    with pytest.raises(AssertionError):
        measure_compression(nested_graph, cache_dir=nested_cache, codecs=("int8",))
    with pytest.raises(AssertionError):
        measure_compression(nested_graph, cache_dir=nested_cache, tensors=["pool:0"])
    # codec order does not matter
    assert measure_compression(nested_graph, cache_dir=nested_cache, codecs=("int8", "float16")) == nested_profile


def test_subset_and_refusals(nested_graph, tmp_path):
    from splitinfer.monitor import measure_compression
    from splitinfer.splitter import SplitError

    sub = measure_compression(nested_graph, tensors=["pool:0"], codecs=("int8",), samples=2, cache_dir=tmp_path)
    assert [(e.tensor, e.codec) for e in sub.entries] == [("pool:0", "int8")]
    with pytest.raises(SplitError, match="not a single-tensor cut point"):
        measure_compression(nested_graph, tensors=["head/h_dense2:0"], cache=False)  # the final output
    with pytest.raises(SplitError, match="unknown tensor"):
        measure_compression(nested_graph, tensors=["nope:0"], cache=False)
    with pytest.raises(ValueError, match="unknown codec"):
        measure_compression(nested_graph, codecs=("zstd",), cache=False)


def test_mobilenet_v3_small_float16_is_close(tmp_path):
    from splitinfer.monitor import measure_compression
    from splitinfer.splitter import ModelGraph, load_source_model

    graph = ModelGraph(load_source_model("keras.applications:MobileNetV3Small", (96, 96, 3)))
    points = graph.cut_points()
    chosen = [points[2], points[len(points) // 2], points[-3]]
    profile = measure_compression(graph, tensors=chosen, samples=4, cache_dir=tmp_path)
    assert profile.tensors == chosen
    for e in profile.entries:
        assert 0.0 <= e.top1_agreement <= 1.0
        if e.codec == "float16":
            assert e.max_abs_error < 1e-2
    # the shallow cut carries activations of order 1: float16 keeps them to ~1e-3 relative
    assert profile.entry(chosen[0], "float16").cut_error < 1e-3
