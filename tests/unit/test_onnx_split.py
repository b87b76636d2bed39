"""Splitting ONNX models: every valid cut and random acyclic partitions compose back exactly on ONNX Runtime, the
parts are self-contained checked ONNX models that keep the free batch dimension, bad files get one-line errors,
FLOPs are counted from the shapes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from splitinfer.monitor.onnx_flops import node_flops_onnx
from splitinfer.splitter import SplitError, load_graph, save_split, split_at_cuts, split_by_groups, verify_split
from splitinfer.splitter.manifest import Manifest
from splitinfer.splitter.partition import balanced_cuts
from splitinfer.splitter.runtimes import load_parts
from splitinfer.splitter.tensors import random_inputs
from splitinfer.splitter.verify import run_parts
from tests.support.onnx_models import fork_join, residual_cnn, two_in_two_out

TOLERANCE = 1e-5
MODELS = {"residual_cnn": residual_cnn, "two_in_two_out": two_in_two_out, "fork_join": fork_join}


@pytest.fixture(params=list(MODELS))
def model_file(request, tmp_path):
    path = tmp_path / f"{request.param}.onnx"
    onnx.save(MODELS[request.param](), path)
    return path


def _verified(graph, specs, out, origin):
    manifest = save_split(graph, specs, out, origin=str(origin))
    report = verify_split(out, samples=2)
    assert report["max_abs_error"] <= TOLERANCE, report
    return manifest, report


def test_every_valid_cut_composes_back_exactly(model_file, tmp_path):
    """Every single-tensor cut point, and the cut after every prefix of the topological order (a multi-tensor cut
    where branches or several inputs are live: the two-input model has no single-tensor cut point)."""
    graph = load_graph(str(model_file))
    points = graph.cut_points()
    assert not set(points) & set(graph.weights), "weights are never cut points"
    splits = [split_at_cuts(graph, [p]) for p in points]
    compute = graph.compute_nodes
    splits += [split_by_groups(graph, {n: int(j > i) for j, n in enumerate(compute)}) for i in range(len(compute) - 1)]
    for i, specs in enumerate(splits):
        manifest, report = _verified(graph, specs, tmp_path / f"cut{i}", model_file)
        assert report["tensors_compared"] >= 2 and [p.format for p in manifest.parts] == ["onnx", "onnx"]
    assert any(len(specs[1].inputs) > 1 for specs in splits), "some cut hands over several tensors"


def test_random_acyclic_partitions_compose_back_exactly(model_file, tmp_path):
    graph = load_graph(str(model_file))
    rng = np.random.default_rng(7)
    for trial in range(6):
        order = _random_topological_order(graph, rng)
        k = int(rng.integers(2, min(5, len(order)) + 1))
        bounds = sorted(rng.choice(np.arange(1, len(order)), size=k - 1, replace=False))
        groups = {n: int(np.searchsorted(bounds, i, side="right")) for i, n in enumerate(order)}
        specs = split_by_groups(graph, groups)
        manifest, _ = _verified(graph, specs, tmp_path / f"p{trial}", model_file)
        assert len(manifest.parts) == k
        assert sorted(op for p in manifest.parts for op in p.operations) == sorted(graph.compute_nodes)


def _random_topological_order(graph, rng) -> list[str]:
    """The compute nodes in a random order that keeps every producer before its consumers."""
    deps = {n: {graph.tensors[t].producer for t in graph.nodes[n].unique_inputs} - set(graph.input_nodes)
            for n in graph.compute_nodes}
    order, done = [], set()
    while len(order) < len(deps):
        ready = sorted(n for n in deps if n not in done and deps[n] <= done)
        pick = ready[int(rng.integers(len(ready)))]
        order.append(pick)
        done.add(pick)
    return order


def test_a_multi_tensor_frontier_cuts_across_both_branches(tmp_path):
    path = tmp_path / "fork_join.onnx"
    onnx.save(fork_join(), path)
    graph = load_graph(str(path))
    with pytest.raises(SplitError, match="does not separate the graph"):
        split_at_cuts(graph, ["left1_r"])
    manifest, _ = _verified(graph, split_at_cuts(graph, ["left1_r+gate"]), tmp_path / "s", path)
    assert sorted(t.name for t in manifest.parts[1].inputs) == ["gate", "left1_r"]


def test_parts_keep_the_free_batch_dimension_and_run_at_any_batch(tmp_path):
    path = tmp_path / "two.onnx"
    onnx.save(two_in_two_out(), path)
    graph = load_graph(str(path))
    head = {"Concat_7", "MatMul_8", "Add_9"}  # the score's head in the second part, the embedding in the first
    assert head <= set(graph.compute_nodes)
    specs = split_by_groups(graph, {n: int(n in head) for n in graph.compute_nodes})
    manifest = save_split(graph, specs, tmp_path / "s", origin=str(path))
    for entry in manifest.parts:
        part = onnx.load(tmp_path / "s" / entry.file)
        onnx.checker.check_model(part, full_check=True)
        for value in part.graph.input:
            assert value.type.tensor_type.shape.dim[0].dim_param, f"{entry.name} input {value.name} fixed its batch"
    assert [t.name for t in manifest.outputs] == ["score", "embedding"]
    assert "embedding" in [t.name for t in manifest.parts[0].outputs]
    inputs = random_inputs(manifest.inputs, batch=4, seed=3)
    got = run_parts(load_parts(tmp_path / "s", manifest), inputs)
    from splitinfer.splitter.onnx_build import reference_session

    want = reference_session(graph, graph.outputs)(inputs)
    for name in ("score", "embedding"):
        assert got[name].shape[0] == 4
        np.testing.assert_allclose(got[name], want[name], atol=TOLERANCE)


def test_parts_balanced_by_counted_flops(tmp_path):
    path = tmp_path / "res.onnx"
    onnx.save(residual_cnn(), path)
    graph = load_graph(str(path))
    flops = node_flops_onnx(graph)
    specs = split_at_cuts(graph, balanced_cuts(graph, flops, 3))
    manifest, _ = _verified(graph, specs, tmp_path / "s", path)
    per_part = [sum(flops[n] for n in p.operations) for p in manifest.parts]
    assert len(per_part) == 3 and max(per_part) < 0.6 * sum(per_part)


def test_flops_match_the_analytic_count_of_known_layers(tmp_path):
    path = tmp_path / "res.onnx"
    onnx.save(residual_cnn(channels=8, size=12), path)
    graph = load_graph(str(path))
    flops = node_flops_onnx(graph)
    # stem: 3x3 conv, 3 -> 8 channels on 12x12, bias: 2*MACs + one add per output
    assert flops["stem"] == 2 * (8 * 12 * 12) * (3 * 3 * 3) + 8 * 12 * 12
    gemm = next(n for n in graph.compute_nodes if graph.nodes[n].op_type == "Gemm")
    assert flops[gemm] == 2 * 10 * 8 + 10
    relu = next(n for n in graph.compute_nodes if graph.nodes[n].op_type == "Relu")
    assert flops[relu] == 8 * 12 * 12
    assert all(flops[n] == 0 for n in graph.compute_nodes if graph.nodes[n].op_type == "Flatten")


def test_flops_of_an_exported_keras_model_agree_with_tensorflow_profiler(tmp_path):
    """The same model counted two ways: TF's profiler on the Keras graph, our shapes on its ONNX export."""
    import keras

    from splitinfer.monitor import node_flops
    from splitinfer.splitter import ModelGraph
    from splitinfer.splitter.build import export_onnx

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.Conv2D(16, 1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(10)(x)
    model = keras.Model(inp, out)
    path = export_onnx(model, tmp_path / "small.onnx")
    tf_total = sum(node_flops(ModelGraph(model)).values())
    onnx_total = sum(node_flops_onnx(load_graph(str(path))).values())
    assert onnx_total == pytest.approx(tf_total, rel=0.1)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a valid ONNX file"),
    ("opset_future", "opset 99"),
    ("opset_ancient", "opset 3"),
    ("unknown_op", "Frobnicate"),
    ("empty", "not a valid ONNX file"),
])
def test_bad_onnx_files_get_one_line_errors(tmp_path, damage, message):
    path = tmp_path / "bad.onnx"
    model = residual_cnn()
    if damage == "truncate":
        path.write_bytes(model.SerializeToString()[:400])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        if damage == "unknown_op":
            model.graph.node[2].op_type = "Frobnicate"
        else:
            model.opset_import[0].version = 99 if damage == "opset_future" else 3
        onnx.save(model, path)
    with pytest.raises(SplitError, match=message) as err:
        load_graph(str(path))
    assert "\n" not in str(err.value)


def test_the_cli_splits_and_verifies_an_onnx_file_and_refuses_a_bad_one(tmp_path):
    from typer.testing import CliRunner

    from splitinfer.cli.app import app

    path = tmp_path / "fork.onnx"
    onnx.save(fork_join(), path)
    runner = CliRunner()
    result = runner.invoke(app, ["cuts", str(path), "--json"])
    assert result.exit_code == 0, result.output
    cuts = json.loads(result.output)["cut_points"]
    groups = tmp_path / "groups.json"
    graph = load_graph(str(path))
    half = len(graph.compute_nodes) // 2
    groups.write_text(json.dumps([graph.compute_nodes[:half], graph.compute_nodes[half:]]))
    for args in (["--parts", "3"], ["--cuts", cuts[0]["tensor"]], ["--partition", str(groups)]):
        out = tmp_path / f"split{args[0]}"
        result = runner.invoke(app, ["split", str(path), "-o", str(out), "--json", *args])
        assert result.exit_code == 0, result.output
        assert Manifest.load(out).source.format == "onnx"
        result = runner.invoke(app, ["verify", str(out), "--json", "--tolerance", str(TOLERANCE)])
        assert result.exit_code == 0 and json.loads(result.output)["ok"], result.output
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    result = runner.invoke(app, ["split", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "b"), "--parts", "2"])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
