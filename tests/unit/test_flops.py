"""FLOPs per operation: attributed by private name scopes, adding up to TF's profiler total for the model."""

from __future__ import annotations

import pytest

from splitinfer.monitor import node_flops, whole_model_profiler_flops
from splitinfer.splitter import ModelGraph, load_source_model
from tests.support.splitter_models import SMALL_MODELS, dict_inputs


@pytest.fixture(scope="module")
def graphs():
    cache: dict[str, ModelGraph] = {}

    def get(name: str) -> ModelGraph:
        if name not in cache:
            cache[name] = ModelGraph(load_source_model(f"keras.applications:{name}"))
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["MobileNetV3Large", "ResNet50", "InceptionV3"])
def test_total_matches_profiler_on_whole_model(graphs, name):
    graph = graphs(name)
    flops = node_flops(graph)
    assert set(flops) == set(graph.compute_nodes)
    total = whole_model_profiler_flops(graph)
    assert total > 0
    assert abs(sum(flops.values()) - total) <= 0.02 * total, (sum(flops.values()), total)


def test_convolutions_carry_the_flops(graphs):
    graph = graphs("ResNet50")
    flops = node_flops(graph)
    # conv1_conv: 7x7x3 -> 64 channels on a 112x112 map, 2 FLOPs per multiply-add, plus the bias add
    assert flops["conv1_conv"] == 2 * 112 * 112 * 64 * 7 * 7 * 3 + 112 * 112 * 64
    assert all(v == 0 for n, v in flops.items() if graph.nodes[n].op_type in ("ZeroPadding2D", "InputLayer"))


def test_batch_scales_flops(graphs):
    graph = graphs("MobileNetV3Large")
    one, four = node_flops(graph, 1), node_flops(graph, 4)
    assert sum(four.values()) == pytest.approx(4 * sum(one.values()), rel=0.01)


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_nested_shared_and_multi_io_models_add_up(name):
    graph = ModelGraph(SMALL_MODELS[name]())
    flops = node_flops(graph, batch=2)
    assert set(flops) == set(graph.compute_nodes)
    assert sum(flops.values()) == whole_model_profiler_flops(graph, batch=2)


def test_shared_layer_calls_counted_separately():
    graph = ModelGraph(SMALL_MODELS["siamese"]())
    flops = node_flops(graph)
    assert flops["shared"] > 0 and flops["shared"] == flops["shared@1"]


def test_a_call_recorded_with_training_true_is_counted_as_inference():
    """Monte-Carlo dropout (`Dropout(...)(x, training=True)`) runs as inference when the model is called with
    training=False, as parts and servers call it: the per-operation count must not include the dropout ops."""
    import keras

    inp = keras.Input((16,), name="x")
    h = keras.layers.Dropout(0.5, name="mc")(keras.layers.Dense(16, name="d")(inp), training=True)
    h = keras.layers.BatchNormalization(name="bn")(h, training=True)
    graph = ModelGraph(keras.Model(inp, keras.layers.Dense(2, name="o")(h), name="mc_dropout"))
    flops = node_flops(graph)
    assert flops["mc"] == 0
    assert sum(flops.values()) == whole_model_profiler_flops(graph)


@pytest.mark.filterwarnings("ignore:When providing `inputs` as a dict")
def test_dict_inputs_keyed_unlike_their_names():
    graph = ModelGraph(dict_inputs())
    assert sum(node_flops(graph).values()) == whole_model_profiler_flops(graph) > 0
