"""A PyTorch model (a small residual CNN with a gate, random weights) exported with torch.onnx.export: split into
3 parts, verified within 1e-5, and served end to end over the real broker on `splitinfer up`'s servers, every answer
within 1e-5 of PyTorch's own. Opt-in: `pip install -e .[torch]` then `pytest --runtorch tests/e2e/test_torch_export.py`."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.support.broker import requires_broker

pytestmark = [pytest.mark.torch, requires_broker]

TOL = 1e-5


def _torch_model():
    import torch
    from torch import nn

    class GatedResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.a = nn.Conv2d(8, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.gate = nn.Conv2d(8, 8, 1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.bn(self.stem(x)))
            y = self.b(torch.relu(self.a(x))) + x
            y = y * torch.sigmoid(self.gate(x))
            return self.head(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = GatedResidual()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_a_pytorch_export_splits_verifies_and_serves_over_the_broker(tmp_path, run_prefix):
    torch = pytest.importorskip("torch")

    from splitinfer.client import Client
    from splitinfer.monitor import node_flops
    from splitinfer.splitter import load_graph, save_split, split_at_cuts, verify_split
    from splitinfer.splitter.partition import balanced_cuts
    from tests.support.up_cluster import up_cluster

    net = _torch_model()
    path = tmp_path / "gated.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    graph = load_graph(str(path))
    manifest = save_split(graph, split_at_cuts(graph, balanced_cuts(graph, node_flops(graph), 3)), tmp_path / "s",
                          origin=str(path))
    assert len(manifest.parts) == 3
    assert verify_split(tmp_path / "s", samples=3)["max_abs_error"] <= TOL
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(1, 3, 16, 16)).astype(np.float32) for _ in range(8)]
    with torch.no_grad():
        want = [net(torch.from_numpy(x)).numpy() for x in xs]
    config = '[[servers]]\nid = "edge"\nsite = "edge"\n\n[[servers]]\nid = "cloud"\nsite = "cloud"\n'
    with up_cluster(tmp_path / "cluster", run_prefix, config, tag="torch") as cluster:
        async def go():
            async with Client(cluster.settings) as c:
                dep = await c.deploy(tmp_path / "s", min_servers=2, timeout=300)
                return await asyncio.gather(*(c.infer(dep.deployment, {"image": x}, timeout=120) for x in xs))

        results = asyncio.run(go())
    for got, ref in zip(results, want):
        np.testing.assert_allclose(got.outputs["logits"], ref, atol=TOL, rtol=0)
    assert np.max(np.abs(want[0] - want[1])) > 10 * TOL  # the answers depend on the input
