"""Small hand-built models with the shapes that broke splitters before (see seeds/notes-splitting-grpc-flops.md)."""

from __future__ import annotations

import random

from splitinfer import _tf  # noqa: F401
import keras
from keras import layers, ops


def nested_backbone() -> keras.Model:
    """A Functional backbone and a Sequential head used as layers, as keras-hub/KerasCV models do."""
    bin_ = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", name="b_conv1")(bin_)
    x = layers.BatchNormalization(name="b_bn1")(x)
    y = layers.ReLU(name="b_relu1")(x)
    x = layers.Conv2D(8, 3, padding="same", name="b_conv2")(y)
    x = layers.Add(name="b_add")([x, y])
    backbone = keras.Model(bin_, layers.ReLU(name="b_out")(x * 0.5 + 1.0), name="backbone")
    head = keras.Sequential(
        [keras.Input((8,)), layers.Dense(16, activation="relu", name="h_dense1"), layers.Dense(4, name="h_dense2")],
        name="head",
    )
    inp = keras.Input((16, 16, 3), name="image")
    x = layers.Conv2D(3, 1, name="stem")(inp)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, head(x), name="nested")


def siamese() -> keras.Model:
    """The same nested model and the same Dense layer called twice (shared weights)."""
    tin = keras.Input((12,))
    tower = keras.Model(tin, layers.Dense(6, activation="tanh", name="t_dense")(layers.Dense(10, name="t_in")(tin)), name="tower")
    a, b = keras.Input((12,), name="left"), keras.Input((12,), name="right")
    shared = layers.Dense(5, name="shared")
    ea, eb = shared(tower(a)), shared(tower(b))
    d = layers.Subtract(name="diff")([ea, eb])
    return keras.Model([a, b], layers.Dense(1, name="score")(ops.abs(d)), name="siamese")


def multi_output_layer() -> keras.Model:
    """A layer with several outputs (LSTM return_state) and a non-layer op with several (ops.split)."""
    inp = keras.Input((7, 6), name="seq")
    seq, h, c = layers.LSTM(8, return_sequences=True, return_state=True, name="lstm")(inp)
    left, right = ops.split(seq, 2, axis=-1)
    x = layers.Dense(4, name="from_left")(layers.Flatten(name="flat_left")(left))
    y = layers.Dense(4, name="from_right")(layers.Flatten(name="flat_right")(right))
    z = layers.Dense(4, name="from_h")(h)
    w = layers.Dense(4, name="from_c")(c)
    out = layers.Add(name="sum")([x, y, z, w])
    return keras.Model(inp, out, name="multi_output")


@keras.saving.register_keras_serializable(package="splitinfer_tests")
class SplitHeads(layers.Layer):
    """A layer whose output is a dict (flattened by key: high is output 0, low is output 1)."""

    def call(self, x):
        half = x.shape[-1] // 2
        return {"low": x[..., :half], "high": x[..., half:] * 2.0}


def dict_output_layer() -> keras.Model:
    inp = keras.Input((10,), name="x")
    heads = SplitHeads(name="heads")(layers.Dense(8, name="pre")(inp))
    low = layers.Dense(3, name="from_low")(heads["low"])
    high = layers.Dense(3, name="from_high")(heads["high"])
    return keras.Model(inp, layers.Add(name="sum")([low, high]), name="dict_output_layer")


def two_in_two_out() -> keras.Model:
    """Two inputs (one integer token input) and two outputs at different depths."""
    tokens = keras.Input((10,), dtype="int32", name="tokens")
    feats = keras.Input((5,), name="features")
    e = layers.Embedding(50, 8, name="embed")(tokens)
    e = layers.GlobalAveragePooling1D(name="avg")(e)
    f = layers.Dense(8, activation="relu", name="feat_dense")(feats)
    j = layers.Concatenate(name="join")([e, f])
    aux = layers.Dense(3, name="aux")(j)
    x = layers.Dense(16, activation="relu", name="trunk1")(j)
    x = layers.Dense(16, activation="relu", name="trunk2")(x)
    main = layers.Dense(2, activation="softmax", name="main")(x)
    return keras.Model([tokens, feats], [main, aux], name="two_in_two_out")


def dict_output() -> keras.Model:
    """A dict of outputs, flattened by key; a fork whose branches rejoin."""
    inp = keras.Input((20,), name="x")
    trunk = layers.Dense(12, activation="relu", name="trunk")(inp)
    a = layers.Dense(6, activation="relu", name="branch_a")(trunk)
    b = layers.Dense(6, activation="sigmoid", name="branch_b")(trunk)
    joined = layers.Multiply(name="gate")([a, b])
    return keras.Model(
        inp,
        {"score": layers.Dense(1, name="score")(joined), "embedding": layers.Dense(4, name="embedding")(trunk + 3.0)},
        name="dict_output",
    )


def masked_attention() -> keras.Model:
    """Keras masks (Embedding(mask_zero=True)) read by layers that never take them as arguments: Maximum/Multiply,
    MultiHeadAttention (called with query/value/key keywords; it clears its inputs' masks, so the residual Add sees
    only its own) and a masked GlobalAveragePooling1D. Integer token inputs include 0, so the masks matter."""
    tokens = keras.Input((10,), dtype="int32", name="tokens")
    x = layers.Embedding(50, 8, mask_zero=True, name="emb")(tokens)
    g = layers.Maximum(name="max")([layers.Dense(8, name="gate_a")(x), layers.Dense(8, name="gate_b")(x)])
    g = layers.Multiply(name="mul")([g, x])
    a = layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(query=g, value=g, key=g)
    x = layers.LayerNormalization(name="ln")(layers.Add(name="res")([g, a]))
    return keras.Model(tokens, layers.Dense(3, name="head")(layers.GlobalAveragePooling1D(name="gap")(x)),
                       name="masked_attention")


def masked_nested() -> keras.Model:
    """A masked tensor into a nested Functional (which puts the mask on its own input) and a masked LSTM."""
    i = keras.Input((9, 8))
    h = layers.Dense(8, name="in_pre")(i)
    block = keras.Model(i, layers.Add(name="in_res")([h, layers.MultiHeadAttention(2, 4, name="in_mha")(h, h)]),
                        name="block")
    tokens = keras.Input((9,), dtype="int32", name="tokens")
    x = block(layers.Embedding(30, 8, mask_zero=True, name="emb")(tokens))
    x = layers.LSTM(6, return_sequences=True, name="lstm")(x)
    x = layers.GRU(4, name="gru")(layers.Dense(5, name="proj")(x))
    return keras.Model(tokens, layers.Dense(2, name="head")(x), name="masked_nested")


def keras_ops_graph() -> keras.Model:
    """keras.ops called directly on KerasTensors: concatenate, reshape, transpose, split, slicing, mean with axis,
    a constant multiply; a list-taking layer fed the same tensor twice; Dropout/BatchNormalization at inference;
    a Functional nested twice."""
    inner_in = keras.Input((8,))
    inner = keras.Model(inner_in, layers.Dense(8, activation="relu", name="core")(inner_in), name="inner")
    mid_in = keras.Input((8,))
    mid = keras.Model(mid_in, layers.Dense(4, name="mid_out")(inner(layers.Dense(8, name="mid_in")(mid_in))),
                      name="mid")
    inp = keras.Input((6, 8), name="x")
    a = layers.Dense(8, name="d1")(inp)
    c = ops.concatenate([a, inp], axis=-1)
    t = ops.transpose(ops.reshape(c, (-1, 12, 8)), (0, 2, 1))
    p, q = ops.split(t, 2, axis=-1)
    y = layers.Dense(8, name="d2")(layers.Flatten(name="flat")(p[:, 1:])) * 0.5
    y = layers.Dropout(0.5, name="drop")(layers.BatchNormalization(name="bn")(y))
    z = layers.Concatenate(name="twice")([ops.mean(q, axis=1), ops.mean(q, axis=1)])
    z = mid(layers.Dense(8, name="d3")(z))
    return keras.Model(inp, layers.Add(name="sum")([layers.Dense(4, name="d4")(y), z]), name="keras_ops_graph")


def odd_io() -> keras.Model:
    """Inputs given as a dict, one of them unused; an output that is directly an input, the same tensor as two
    outputs, an output that is also consumed further; mixed dtypes (an int input, a float16 layer)."""
    a = keras.Input((5,), name="a")
    ids = keras.Input((4,), dtype="int32", name="ids")
    unused = keras.Input((3,), name="unused")
    h = layers.Dense(6, name="h")(a)
    half = layers.Dense(6, dtype="float16", name="half")(h)
    e = layers.Flatten(name="flat")(layers.Embedding(20, 2, name="emb")(ids))
    j = layers.Concatenate(name="join")([ops.cast(half, "float32"), e])
    out = layers.Dense(2, name="out")(j)
    return keras.Model({"a": a, "ids": ids, "unused": unused}, [out, a, h, out], name="odd_io")


def dict_inputs() -> keras.Model:
    """Inputs as a dict whose keys are not the input names (Keras warns, but takes it): the model must be called
    with a dict, flattened by key (`alpha:0` for key "a" before `zeta:0` for key "z")."""
    z, a = keras.Input((4,), name="zeta"), keras.Input((3,), name="alpha")
    y = layers.Concatenate(name="cat")([layers.Dense(2, name="dz")(z), layers.Dense(2, name="da")(a)])
    return keras.Model({"z": z, "a": a}, layers.Dense(1, name="out")(y), name="dict_inputs")


SMALL_MODELS = {
    "nested": nested_backbone,
    "siamese": siamese,
    "multi_output": multi_output_layer,
    "two_in_two_out": two_in_two_out,
    "dict_output": dict_output,
    "dict_output_layer": dict_output_layer,
    "masked_attention": masked_attention,
    "masked_nested": masked_nested,
    "keras_ops_graph": keras_ops_graph,
    "odd_io": odd_io,
}


def random_partition(graph, n_groups: int, seed: int) -> dict[str, int]:
    """Cut a random topological order into contiguous runs: always acyclic, often with multi-tensor frontiers."""
    rng = random.Random(seed)
    indeg = {n: 0 for n in graph.compute_nodes}
    users: dict[str, list[str]] = {n: [] for n in graph.compute_nodes}
    for n in graph.compute_nodes:
        for t in graph.nodes[n].unique_inputs:
            p = graph.tensors[t].producer
            if p in indeg:
                indeg[n] += 1
                users[p].append(n)
    ready = [n for n, d in indeg.items() if d == 0]
    order = []
    while ready:
        n = ready.pop(rng.randrange(len(ready)))
        order.append(n)
        for u in users[n]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    n_groups = max(1, min(n_groups, len(order)))
    bounds = sorted(rng.sample(range(1, len(order)), n_groups - 1)) if n_groups > 1 else []
    groups, g = {}, 0
    for i, n in enumerate(order):
        while g < len(bounds) and i >= bounds[g]:
            g += 1
        groups[n] = g
    return groups
