"""Split real models at every valid cut point and at random acyclic partitions; the parts must compose back exactly."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from splitinfer import _tf  # noqa: F401
import keras

from splitinfer.splitter import (
    Manifest,
    ModelGraph,
    SplitError,
    load_source_model,
    save_split,
    split_at_cuts,
    split_by_groups,
    verify_split,
)
from splitinfer.splitter.partition import balanced_cuts
from tests.support.splitter_models import SMALL_MODELS, dict_inputs, random_partition

TOLERANCE = 1e-5
BIG_MODELS = [
    "MobileNetV3Large",
    "MobileNetV3Small",
    "MobileNetV2",
    "ResNet50",
    "DenseNet121",
    "InceptionV3",
    "EfficientNetB0",
]


def _split_and_verify(graph, specs, out_dir, samples=1) -> Manifest:
    manifest = save_split(graph, specs, out_dir, origin="test")
    report = verify_split(out_dir, samples=samples)
    assert report["max_abs_error"] <= TOLERANCE, report
    assert report["parts"] == len(specs)
    return manifest


def _check_manifest(graph, manifest: Manifest) -> None:
    """Every part input is a model input or some earlier part's output that names this part as a consumer."""
    produced: dict[str, str] = {}
    for part in manifest.parts:
        for t in part.inputs:
            if t.name in graph.inputs:
                continue
            assert t.name in produced, f"{part.name} needs {t.name} before any part produced it"
            owner = manifest.part(produced[t.name])
            assert part.name in next(o.consumers for o in owner.outputs if o.name == t.name)
        for o in part.outputs:
            produced[o.name] = part.name
    finals = [o.name for p in manifest.parts for o in p.outputs if o.final]
    assert sorted(set(finals)) == sorted(set(manifest.output_names))
    ops = [op for p in manifest.parts for op in p.operations]
    assert sorted(ops) == sorted(graph.compute_nodes), "every operation in exactly one part"


# The default run splits the large models at an even sample of their cut points (all of them for
# MobileNetV3Large) and one random partition; --runslow takes every cut point and more partitions.
ALL_CUTS_ALWAYS = {"MobileNetV3Large"}
CUT_SAMPLE = 16


@pytest.mark.parametrize("name", BIG_MODELS)
def test_application_every_cut_point_and_random_partitions(name, tmp_path, request):
    exhaustive = request.config.getoption("--runslow")
    graph = ModelGraph(load_source_model(f"keras.applications:{name}"))
    points = graph.cut_points()
    assert len(points) >= 5, f"{name} should have several single-tensor cut points"
    chosen = points
    if not exhaustive and name not in ALL_CUTS_ALWAYS and len(points) > CUT_SAMPLE:
        step = len(points) / CUT_SAMPLE
        chosen = [points[int(i * step)] for i in range(CUT_SAMPLE)]
    # One split at many cut points at once exercises each of them as a part boundary.
    manifest = _split_and_verify(graph, split_at_cuts(graph, chosen), tmp_path / "all")
    assert len(manifest.parts) == len(chosen) + 1
    for part, cut in zip(manifest.parts, chosen):
        assert [o.name for o in part.outputs if not o.final] == [cut], "a single-tensor cut hands over one tensor"
    _check_manifest(graph, manifest)
    for seed in (1, 2) if exhaustive else (1,):
        specs = split_by_groups(graph, random_partition(graph, 4, seed=zlib.crc32(f"{name}{seed}".encode())))
        manifest = _split_and_verify(graph, specs, tmp_path / f"random{seed}")
        _check_manifest(graph, manifest)


def test_ghost_ops_are_nodes_and_can_sit_at_a_boundary(tmp_path):
    graph = ModelGraph(load_source_model("keras.applications:MobileNetV3Small"))
    assert len(graph.compute_nodes) == len(graph.model.operations) - 1  # everything but the InputLayer
    ghosts = [n for n, node in graph.nodes.items() if not isinstance(node.operation, keras.layers.Layer)]
    assert ghosts, "x + 3.0 in hard_sigmoid must show up as a node"
    # Put the first ghost op alone in the middle part: its input and output both cross a boundary.
    ghost = ghosts[0]
    i = graph.index[ghost]
    groups = {n: (0 if graph.index[n] < i else 1 if n == ghost else 2) for n in graph.compute_nodes}
    manifest = _split_and_verify(graph, split_by_groups(graph, groups), tmp_path)
    assert manifest.parts[1].operations == [ghost]


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_small_models_every_cut_and_random_partitions(name, tmp_path):
    keras.utils.set_random_seed(7)
    graph = ModelGraph(SMALL_MODELS[name]())
    points = graph.cut_points()
    if points:
        manifest = _split_and_verify(graph, split_at_cuts(graph, points), tmp_path / "all", samples=2)
        _check_manifest(graph, manifest)
    for seed in range(4):
        groups = random_partition(graph, 2 + seed, seed)
        manifest = _split_and_verify(graph, split_by_groups(graph, groups), tmp_path / f"r{seed}", samples=2)
        _check_manifest(graph, manifest)
    # Every operation in its own part: the hardest partition there is.
    singles = {n: i for i, n in enumerate(graph.compute_nodes)}
    _split_and_verify(graph, split_by_groups(graph, singles), tmp_path / "singles", samples=2)


def test_nested_models_are_flattened_and_cut_inside(tmp_path):
    keras.utils.set_random_seed(1)
    graph = ModelGraph(SMALL_MODELS["nested"]())
    assert "backbone/b_conv2" in graph.nodes and "head/h_dense1" in graph.nodes
    assert "backbone" not in graph.nodes, "the nested model itself is not an opaque node"
    # Cutting inside the backbone needs the residual branch too: the frontier names both tensors.
    with pytest.raises(SplitError, match="does not separate"):
        split_at_cuts(graph, ["backbone/b_conv2:0"])
    specs = split_at_cuts(graph, ["backbone/b_conv2:0+backbone/b_relu1:0", "head/h_dense1:0"])
    manifest = _split_and_verify(graph, specs, tmp_path, samples=2)
    assert sorted(t.name for t in manifest.parts[1].inputs) == ["backbone/b_conv2:0", "backbone/b_relu1:0"]
    assert manifest.parts[0].outputs[0].consumers == ["part1"]


def test_shared_layer_calls_get_distinct_stable_names():
    keras.utils.set_random_seed(2)
    graph = ModelGraph(SMALL_MODELS["siamese"]())
    assert {"shared", "shared@1", "tower/t_dense", "tower@1/t_dense"} <= set(graph.nodes)
    again = ModelGraph(graph.model)
    assert list(again.tensors) == list(graph.tensors)


def test_multi_output_layer_outputs_go_to_different_parts(tmp_path):
    keras.utils.set_random_seed(3)
    graph = ModelGraph(SMALL_MODELS["multi_output"]())
    assert graph.nodes["lstm"].outputs == ["lstm:0", "lstm:1", "lstm:2"]
    consumers = {n: (0 if n == "lstm" else 1 if n in ("from_h",) else 2) for n in graph.compute_nodes}
    manifest = _split_and_verify(graph, split_by_groups(graph, consumers), tmp_path, samples=2)
    first = manifest.parts[0]
    assert {o.name: o.consumers for o in first.outputs} == {
        "lstm:0": ["part2"],
        "lstm:1": ["part1"],
        "lstm:2": ["part2"],
    }


def test_dict_output_layer_outputs_go_to_different_parts(tmp_path):
    keras.utils.set_random_seed(6)
    graph = ModelGraph(SMALL_MODELS["dict_output_layer"]())
    assert graph.nodes["heads"].outputs == ["heads:0", "heads:1"]
    groups = {n: {"from_low": 1, "from_high": 2, "sum": 3}.get(n, 0) for n in graph.compute_nodes}
    manifest = _split_and_verify(graph, split_by_groups(graph, groups), tmp_path, samples=2)
    assert {o.name: o.consumers for o in manifest.parts[0].outputs} == {"heads:0": ["part2"], "heads:1": ["part1"]}


def test_two_inputs_two_outputs_and_dict_outputs(tmp_path):
    keras.utils.set_random_seed(4)
    graph = ModelGraph(SMALL_MODELS["two_in_two_out"]())
    assert graph.inputs == ["tokens:0", "features:0"]
    assert graph.outputs == ["main:0", "aux:0"]
    manifest = _split_and_verify(graph, split_at_cuts(graph, ["join:0"]), tmp_path / "a", samples=3)
    assert {o.name for o in manifest.parts[1].outputs if o.final} == {"main:0", "aux:0"}
    graph = ModelGraph(SMALL_MODELS["dict_output"]())
    assert graph.output_keys == ["embedding", "score"]
    manifest = _split_and_verify(graph, split_at_cuts(graph, ["trunk:0"]), tmp_path / "b", samples=3)
    assert manifest.output_keys == ["embedding", "score"]


def test_invalid_splits_name_the_problem():
    keras.utils.set_random_seed(5)
    graph = ModelGraph(SMALL_MODELS["dict_output"]())
    with pytest.raises(SplitError, match="unknown tensor 'nope:0'"):
        split_at_cuts(graph, ["nope:0"])
    with pytest.raises(SplitError, match="does not separate the graph"):
        split_at_cuts(graph, ["branch_a:0"])
    with pytest.raises(SplitError, match="model input"):
        split_at_cuts(graph, ["x:0"])
    with pytest.raises(SplitError, match="same place"):
        split_at_cuts(graph, ["trunk:0", "trunk:0"])
    with pytest.raises(SplitError, match="cyclic"):
        split_by_groups(graph, {n: (1 if n == "branch_a" else 0) for n in graph.compute_nodes})
    with pytest.raises(SplitError, match="unassigned"):
        split_by_groups(graph, {"trunk": 0})
    with pytest.raises(SplitError, match="at most"):
        balanced_cuts(graph, {}, 50)


def test_balanced_cuts_minimise_the_largest_part():
    graph = ModelGraph(load_source_model("keras.applications:MobileNetV3Small"))
    costs = {n: float(graph.tensors[graph.nodes[n].outputs[0]].nbytes()) for n in graph.compute_nodes}
    total = sum(costs.values())
    cuts = balanced_cuts(graph, costs, 4)
    specs = split_at_cuts(graph, cuts)
    part_costs = [sum(costs[n] for n in s.nodes) for s in specs]
    assert len(specs) == 4 and abs(sum(part_costs) - total) < 1e-6
    # Brute force on 3 parts: with no slack the DP's largest part is the best possible; with slack, it stays
    # within it and no other pair of cuts that does hands over fewer bytes.
    points = graph.cut_points()

    def peak(cuts):
        return max(sum(costs[n] for n in s.nodes) for s in split_at_cuts(graph, cuts))

    def nbytes(cuts):
        return sum(graph.tensors[t].nbytes() for t in cuts)

    pairs = [[points[i], points[j]] for i in range(len(points)) for j in range(i + 1, len(points))]
    best = min(peak(p) for p in pairs)
    assert peak(balanced_cuts(graph, costs, 3, slack=0.0)) == pytest.approx(best)
    got = balanced_cuts(graph, costs, 3, slack=0.2)
    assert peak(got) <= 1.2 * best + 1e-6
    assert nbytes(got) == min(nbytes(p) for p in pairs if peak(p) <= 1.2 * best + 1e-6)
    assert max(part_costs) < 0.5 * total


def test_manifest_records_hashes_and_topological_order(tmp_path):
    graph = ModelGraph(load_source_model("keras.applications:MobileNetV3Small"))
    points = graph.cut_points()
    manifest = save_split(graph, split_at_cuts(graph, [points[10], points[40]]), tmp_path, origin="x")
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest and loaded.version == 1
    assert len(loaded.source.sha256) == 64 and all(len(p.sha256) == 64 for p in loaded.parts)
    assert [p.name for p in loaded.parts] == ["part0", "part1", "part2"]
    # A tampered part file is refused, not silently run.
    (tmp_path / "part1.keras").write_bytes((tmp_path / "part1.keras").read_bytes() + b"x")
    with pytest.raises(SplitError, match="sha256"):
        verify_split(tmp_path)


def test_load_source_model_errors(tmp_path):
    with pytest.raises(SplitError, match="not found"):
        load_source_model(str(tmp_path / "missing.keras"))
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SplitError, match="not a valid .keras"):
        load_source_model(str(bad))
    with pytest.raises(SplitError, match="keras.applications has no"):
        load_source_model("keras.applications:NoSuchNet")
    with pytest.raises(SplitError, match="cannot build"):
        load_source_model("keras.applications:MobileNetV2", (8, 8, 3))


def test_random_inputs_match_between_split_and_full_model_for_batches(tmp_path):
    """Batch > 1 flows through the parts too (servers batch requests)."""
    from splitinfer.splitter import random_inputs, run_parts
    from splitinfer.splitter.build import full_model_outputs
    from splitinfer.splitter.runtimes import load_parts

    graph = ModelGraph(load_source_model("keras.applications:MobileNetV3Small"))
    manifest = save_split(graph, split_at_cuts(graph, graph.cut_points()[5:40:10]), tmp_path, origin="x")
    parts = load_parts(tmp_path, manifest)
    inputs = random_inputs(manifest.inputs, batch=3, seed=9)
    got = run_parts(parts, inputs)
    want = full_model_outputs(graph.model, manifest, inputs)
    for name, ref in want.items():
        assert got[name].shape == ref.shape == (3, 1000)
        np.testing.assert_allclose(got[name], ref, atol=TOLERANCE)


def test_application_tensor_names_do_not_depend_on_what_the_process_built_before():
    """A job names its inputs as the manifest does, so `keras.applications:NAME` must name its tensors as in a fresh
    process even after other models have used up Keras's auto-name counters."""
    first = ModelGraph(load_source_model("keras.applications:MobileNetV3Small", input_shape=(96, 96, 3)))
    keras.applications.MobileNetV3Small(weights=None, input_shape=(96, 96, 3))
    keras.layers.Add()
    again = ModelGraph(load_source_model("keras.applications:MobileNetV3Small", input_shape=(96, 96, 3)))
    assert again.inputs == first.inputs == ["input_layer:0"]
    assert list(again.nodes) == list(first.nodes)


# -- models no earlier test named: masks, odd inputs/outputs, free input dimensions, auto-named ops -------------


def test_keras_masks_travel_with_the_tensor_they_mask(tmp_path):
    """A mask is a tensor of its own (`emb:mask0`), an input of the layers that read it: a cut before
    MultiHeadAttention or Maximum/Multiply hands it over, and the next part puts it back on its input."""
    keras.utils.set_random_seed(8)
    graph = ModelGraph(SMALL_MODELS["masked_attention"]())
    assert graph.tensors["emb:0"].mask == "emb:mask0" and graph.tensors["emb:mask0"].dtype == "bool"
    assert "mul:mask0" in graph.nodes["mha"].masks
    # MultiHeadAttention clears its inputs' masks as it runs: the residual Add after it reads only the attention's.
    assert graph.nodes["res"].masks == ["mha:mask0"]
    with pytest.raises(SplitError, match=r"mul:mask0"):
        split_at_cuts(graph, ["mul:0"])
    upto_mul = {"emb", "gate_a", "gate_b", "max", "mul"}
    groups = {n: 0 if n in upto_mul else 1 for n in graph.compute_nodes}
    manifest = _split_and_verify(graph, split_by_groups(graph, groups), tmp_path / "a", samples=3)
    assert "mul:mask0" in [t.name for t in manifest.parts[1].inputs]
    # The token input is live there too (the pooling's own mask is computed from it): a frontier may name it.
    manifest = _split_and_verify(graph, split_at_cuts(graph, ["mul:0+mul:mask0+tokens:0"]), tmp_path / "b", samples=3)
    assert {t.name for t in manifest.parts[1].inputs} == {"mul:0", "mul:mask0", "tokens:0"}


def test_masked_tensor_into_a_nested_model_keeps_its_mask_when_cut_inside(tmp_path):
    keras.utils.set_random_seed(9)
    graph = ModelGraph(SMALL_MODELS["masked_nested"]())
    holders = [n for n, node in graph.nodes.items() if node.op_type == "RestoreMask"]
    assert len(holders) == 1 and holders[0].startswith("block/")
    # Cut between the nested model's first layer and its attention: the mask must follow.
    groups = {n: 0 if graph.index[n] <= graph.index["block/in_pre"] else 1 for n in graph.compute_nodes}
    manifest = _split_and_verify(graph, split_by_groups(graph, groups), tmp_path, samples=3)
    assert "block/in_pre:mask0" in [t.name for t in manifest.parts[1].inputs]


def test_unused_input_and_an_input_that_is_also_an_output(tmp_path):
    keras.utils.set_random_seed(10)
    graph = ModelGraph(SMALL_MODELS["odd_io"]())
    assert graph.outputs == ["out:0", "a:0", "h:0", "out:0"]
    assert graph.cut_points() == ["join:0"], "an input nothing consumes does not block a cut"
    manifest = _split_and_verify(graph, split_at_cuts(graph, ["join:0"]), tmp_path, samples=2)
    first = manifest.parts[0]
    assert {o.name for o in first.outputs if o.final} == {"a:0", "h:0"}
    assert [t.name for t in manifest.inputs] == ["a:0", "ids:0", "unused:0"]
    _check_manifest(graph, manifest)


def test_auto_named_mask_ops_of_a_loaded_model_do_not_clash(tmp_path):
    """Loading names an op from its config (`not_equal_1`) while Keras's counter would give that name again to the
    mask op a Masking layer makes when a part is rebuilt; a part holding both used to be refused."""
    from keras.src.utils import naming

    naming.reset_uids()
    keras.ops.not_equal(keras.Input((3,)), 0.0)  # the model is built after another: its mask op is `not_equal_1`
    inp = keras.Input((7, 3), name="seq")
    x = keras.layers.Masking(0.0, name="masking")(inp)
    x = keras.layers.Multiply(name="mul")([keras.layers.Dense(3, name="d")(x), x])
    keras.Model(inp, keras.layers.SimpleRNN(5, name="rnn")(x), name="masking").save(tmp_path / "m.keras")
    naming.reset_uids()  # as in a fresh process
    graph = ModelGraph(load_source_model(str(tmp_path / "m.keras")))
    assert "not_equal_1" in graph.nodes and graph.tensors["masking:0"].mask == "masking:mask0"
    # The first part hands over the Masking layer's mask (its own `not_equal` op) and holds the loaded `not_equal_1`.
    groups = {n: 0 if n in ("masking", "not_equal_1", "any") else 1 for n in graph.compute_nodes}
    manifest = _split_and_verify(graph, split_by_groups(graph, groups), tmp_path / "s", samples=2)
    assert "masking:mask0" in [o.name for o in manifest.parts[0].outputs]


def test_input_shape_fixes_the_free_dimensions_of_a_saved_model(tmp_path):
    inp = keras.Input((None, None, 3), name="img")
    x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    x = keras.layers.Add(name="res")([x, x * 0.5])
    path = tmp_path / "free.keras"
    keras.Model(inp, keras.layers.GlobalAveragePooling2D(name="gap")(x), name="free").save(path)
    graph = ModelGraph(load_source_model(str(path), (16, 16, 3)))
    assert graph.tensors["img:0"].shape == (None, 16, 16, 3) and graph.tensors["conv:0"].shape == (None, 14, 14, 4)
    assert graph.cut_points() == ["conv:0", "res:0"]
    _split_and_verify(graph, split_at_cuts(graph, ["conv:0"]), tmp_path / "s", samples=2)
    with pytest.raises(SplitError, match="takes inputs of shape"):
        load_source_model(str(path), (16, 16))
    # Without a shape, verify cannot guess one; it says so in one line.
    free = ModelGraph(load_source_model(str(path)))
    save_split(free, split_at_cuts(free, ["conv:0"]), tmp_path / "f", origin="x")
    with pytest.raises(SplitError, match="free dimensions"):
        verify_split(tmp_path / "f")


def test_manifest_refuses_files_outside_the_split_directory(tmp_path):
    keras.utils.set_random_seed(11)
    graph = ModelGraph(SMALL_MODELS["dict_output"]())
    save_split(graph, split_at_cuts(graph, ["trunk:0"]), tmp_path, origin="x")
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["parts"][1]["file"] = "../elsewhere.keras"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SplitError, match="not a plain file name"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": ')
    with pytest.raises(SplitError, match="invalid manifest"):
        verify_split(tmp_path)


@pytest.mark.filterwarnings("ignore:When providing `inputs` as a dict")
def test_dict_inputs_keyed_unlike_their_names(tmp_path):
    """verify calls the source model itself: with a dict keyed as its inputs, not a list."""
    keras.utils.set_random_seed(12)
    graph = ModelGraph(dict_inputs())
    assert graph.inputs == ["alpha:0", "zeta:0"]
    _split_and_verify(graph, split_at_cuts(graph, ["cat:0"]), tmp_path, samples=2)
