"""Tensors as the splitter sees them, whatever the model's framework: a name, shape, dtype, producer and
consumers; sample inputs for them, and how far two of them differ. Pure numpy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from splitinfer.splitter.manifest import TensorSpec


@dataclass
class TensorInfo:
    name: str
    shape: tuple  # batch dimension first, None where unknown
    dtype: str
    producer: str  # node name
    consumers: list[str] = field(default_factory=list)
    mask: str | None = None  # the tensor holding its Keras mask (`emb:mask0` for `emb:0`), if it carries one

    def nbytes(self, batch: int = 1) -> int:
        """Bytes of this tensor for `batch` samples (unknown non-batch dims count as 1)."""
        dims = [batch if i == 0 and d is None else (d or 1) for i, d in enumerate(self.shape)]
        return int(np.prod(dims, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def random_array(rng: np.random.Generator, shape: Sequence[int], dtype) -> np.ndarray:
    """A sample input: uniform in [0, 1) for floats, integers 0..9 for integers, 0 or 1 otherwise (bools)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.uniform(0.0, 1.0, size=shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    return rng.integers(0, 2, size=shape).astype(dtype)


def random_inputs(specs: Sequence[TensorSpec], batch: int, seed: int) -> dict[str, np.ndarray]:
    """One random_array per spec at `batch` (unknown dimensions other than the batch are 1), seeded by `seed`."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = [batch if d is None and i == 0 else (d or 1) for i, d in enumerate(spec.shape)]
        out[spec.name] = random_array(rng, shape, spec.dtype)
    return out


def tensor_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref|, divided by the reference's magnitude when that exceeds 1 (deep activations grow large)."""
    if ref.size == 0:
        return 0.0
    diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    return diff / max(1.0, float(np.max(np.abs(ref))))
