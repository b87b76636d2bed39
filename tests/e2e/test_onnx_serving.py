"""ONNX models served as a user would: MobileNetV3Large exported from Keras to ONNX, split into 5 ONNX parts,
deployed with the Client onto `splitinfer up`'s model servers (which run them on ONNX Runtime), and inferred end to
end over the real broker: every answer within 1e-4 of the Keras model, each job answered once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

aio_pika = pytest.importorskip("aio_pika")

from splitinfer.client import Client  # noqa: E402
from tests.support.broker import requires_broker  # noqa: E402
from tests.support.up_cluster import up_cluster  # noqa: E402

pytestmark = requires_broker

TOL = 1e-4


@pytest.fixture(scope="module")
def keras_and_onnx_split(tmp_path_factory):
    """(the Keras model, its ONNX export split into 5 parts balanced by counted FLOPs)."""
    from splitinfer import _tf  # noqa: F401
    import keras

    from splitinfer.monitor import node_flops
    from splitinfer.splitter import load_graph, save_split, split_at_cuts, verify_split
    from splitinfer.splitter.build import export_onnx
    from splitinfer.splitter.partition import balanced_cuts

    root = tmp_path_factory.mktemp("onnx_mnv3")
    keras.utils.set_random_seed(0)
    # logits: with random weights a softmax is ~1/1000 everywhere and could not tell one input's answer from another
    model = keras.applications.MobileNetV3Large(weights=None, classifier_activation=None, input_shape=(224, 224, 3))
    path = export_onnx(model, root / "mnv3.onnx")
    graph = load_graph(str(path))
    save_split(graph, split_at_cuts(graph, balanced_cuts(graph, node_flops(graph), 5)), root / "split",
               origin=str(path))
    assert verify_split(root / "split")["max_abs_error"] <= 1e-5
    return model, root / "split"


def test_an_onnx_split_of_mobilenetv3large_serves_end_to_end_on_onnx_runtime(keras_and_onnx_split, tmp_path,
                                                                              run_prefix):
    from splitinfer.splitter.manifest import Manifest

    model, split = keras_and_onnx_split
    manifest = Manifest.load(split)
    assert len(manifest.parts) == 5 and {p.runtime_name for p in manifest.parts} == {"onnxruntime"}
    config = "".join(f'[[servers]]\nid = "s{i}"\nsite = "{site}"\n\n'
                     for i, site in enumerate(("device", "edge", "cloud")))
    rng = np.random.default_rng(3)
    # pixel values, as the model's own preprocessing expects (on [0, 1) its random-weight logits hardly move)
    xs = [rng.uniform(0, 255, size=(1, 224, 224, 3)).astype(np.float32) for _ in range(12)]
    want = [np.asarray(model(x, training=False)) for x in xs]
    with up_cluster(tmp_path, run_prefix, config, tag="onnx") as cluster:
        async def go():
            async with Client(cluster.settings) as c:
                dep = await c.deploy(split, min_servers=3, timeout=300)
                results = await asyncio.gather(*(c.infer(dep.deployment, {manifest.inputs[0].name: x}, timeout=120)
                                                 for x in xs))
                return dep, results

        dep, results = asyncio.run(go())
    assert len({s for servers in dep.placement.values() for s in servers}) == 3
    out = manifest.outputs[0].name
    scale = max(float(np.max(np.abs(ref))) for ref in want)  # random weights: logits of ~1e-11, so relative too
    for got, ref in zip(results, want):
        assert got.outputs[out].shape == ref.shape
        np.testing.assert_allclose(got.outputs[out], ref, atol=min(TOL, TOL * scale), rtol=0)
    # the answers differ from input to input by far more than that: the comparison is not of constants
    assert np.max(np.abs(want[0] - want[1])) > 100 * TOL * scale
    log = Path(cluster.log).read_text(errors="replace")
    assert "Traceback" not in log, log[-2000:]
