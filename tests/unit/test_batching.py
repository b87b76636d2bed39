"""Batches and their bounds, on a numpy stand-in for a compiled part (pure: no TensorFlow, no broker)."""

from __future__ import annotations

import numpy as np

from splitinfer.actors.model_server.batching import run_batch


class Part:
    """y = 2x + 1 per row, and the batch sizes it was called with."""

    def __init__(self, keeps_batch: bool = True):
        self.calls: list[int] = []
        self.keeps_batch = keeps_batch

    def __call__(self, inputs):
        x = inputs["x"]
        self.calls.append(x.shape[0])
        y = 2 * x + 1
        return {"y": y if self.keeps_batch else y.sum(axis=0)}


def rows(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)}


def test_ready_requests_run_as_one_call_and_get_their_own_rows_back():
    part, reqs = Part(), [rows(1, 0), rows(3, 1), rows(2, 2)]
    outs, _ = run_batch(part, reqs)
    assert part.calls == [6]
    for r, o in zip(reqs, outs):
        np.testing.assert_array_equal(o["y"], 2 * r["x"] + 1)


def test_a_request_larger_than_the_byte_bound_runs_in_slices_with_the_same_outputs():
    part, big = Part(), rows(100, 3)  # 3200 bytes
    [out], _ = run_batch(part, [big], max_bytes=1000)
    assert max(part.calls) <= 31 and sum(part.calls) == 100
    np.testing.assert_array_equal(out["y"], 2 * big["x"] + 1)


def test_requests_are_not_joined_past_the_byte_bound():
    part = Part()
    reqs = [rows(20, 4), rows(20, 5)]  # 640 bytes each
    outs, _ = run_batch(part, reqs, max_bytes=1000)
    assert part.calls == [20, 20]
    for r, o in zip(reqs, outs):
        np.testing.assert_array_equal(o["y"], 2 * r["x"] + 1)


def test_a_part_that_drops_the_batch_axis_runs_whole():
    part, big = Part(keeps_batch=False), rows(50, 6)
    [out], _ = run_batch(part, [big], max_bytes=400)
    np.testing.assert_allclose(out["y"], (2 * big["x"] + 1).sum(axis=0), rtol=1e-5)
    assert part.calls[-1] == 50
