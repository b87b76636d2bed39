"""keras-hub backbones (small configs, no weights) nested in a model with a head: split into 3 parts, then verified
in a fresh process (`splitinfer verify`), as a server would load them. A part whose .keras does not reload (the
ViT's patching layer rejects the config it wrote itself) is saved as ONNX; the others name keras_hub as a package
to import before loading."""

from __future__ import annotations

import json

import pytest

keras_hub = pytest.importorskip("keras_hub")

from tests.support.cli import cli  # noqa: E402

TOL = 1e-5


def _vit():
    import keras

    backbone = keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
                                            hidden_dim=32, mlp_dim=64, include_rescaling=False)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling1D()(backbone(inp))
    return keras.Model(inp, keras.layers.Dense(5)(x), name="vit_head")


def _resnet():
    import keras

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(32, 32, 3))
    inp = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inp))
    return keras.Model(inp, keras.layers.Dense(5)(x), name="resnet_head")


@pytest.mark.parametrize("build", [_vit, _resnet], ids=["vit", "resnet"])
def test_keras_hub_backbones_split_into_three_parts_that_verify_in_a_fresh_process(build, tmp_path):
    from splitinfer import _tf  # noqa: F401
    import keras

    from splitinfer.monitor import node_flops
    from splitinfer.splitter import ModelGraph, save_split, split_at_cuts
    from splitinfer.splitter.partition import balanced_cuts

    keras.utils.set_random_seed(0)
    graph = ModelGraph(build())
    manifest = save_split(graph, split_at_cuts(graph, balanced_cuts(graph, node_flops(graph), 3)), tmp_path / "s",
                          origin="test")
    assert len(manifest.parts) == 3
    assert manifest.source.packages == ["keras_hub"]
    for part in manifest.parts:
        assert part.format == "onnx" or part.packages in ([], ["keras_hub"])
    proc = cli("verify", str(tmp_path / "s"), "--json", "--tolerance", str(TOL))
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    report = json.loads(proc.stdout)
    assert report["ok"] and report["max_abs_error"] <= TOL and report["tensors_compared"] >= 3
