"""Keras parts as servers load and run them: a saved .keras part loaded with safe_mode (the allow-listed packages
its layers need imported first, its sha256 checked) and run as one traced tf.function. The `tf` runtime of
splitter.runtimes; nothing here builds or saves parts (build.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from splitinfer import _tf  # noqa: F401  (quiet TF before keras imports it)
import keras
import tensorflow as tf

from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.graph import error_line
from splitinfer.splitter.manifest import file_sha256

# packages whose Keras layers a part may need registered before it loads: imported by name on the servers, so only
# these (no arbitrary code); a part using layers of any other module is saved as ONNX instead
LAYER_PACKAGES = ("keras_hub", "keras_nlp", "keras_cv", "keras_rs")


def import_layer_packages(packages: Sequence[str]) -> None:
    """Import the allow-listed packages a part's manifest entry names, so their layers are registered."""
    import importlib

    for name in packages:
        if name not in LAYER_PACKAGES:
            raise SplitError(f"a part asks for package {name!r}, not one of {', '.join(LAYER_PACKAGES)}")
        try:
            importlib.import_module(name)
        except ImportError:
            raise SplitError(f"a part needs the {name} package: pip install {name.replace('_', '-')}") from None


def load_part_model(path: Path, expected_sha256: str | None = None, packages: Sequence[str] = ()) -> keras.Model:
    """Load one saved part with safe_mode=True (the allow-listed `packages` its layers need imported first),
    refusing a file whose hash does not match the manifest."""
    path = Path(path)
    if not path.exists():
        raise SplitError(f"part file missing: {path}")
    if not path.is_file():
        raise SplitError(f"part file {path} is not a file")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise SplitError(f"part file {path} does not match the manifest's sha256")
    import_layer_packages(packages)
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:
        raise SplitError(f"cannot load part {path}: {error_line(exc)}") from None


class CompiledPart:
    """A part as one traced tf.function: the way servers run parts (eager per call is ~10x slower).

    Called through its concrete function, traced once for the model's input specs with a free batch dimension:
    that skips tf.function's per-call argument matching (about 0.4 ms of a 5 ms part here). Inputs the concrete
    function refuses (another dtype or rank) go through the polymorphic function, which traces for them."""

    def __init__(self, model: keras.Model, input_names: Sequence[str], output_names: Sequence[str]):
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self._fn = tf.function(lambda xs: model(xs, training=False), reduce_retracing=True)
        self._concrete = None
        try:
            specs = [tf.TensorSpec([None, *kt.shape[1:]] if kt.shape and kt.shape[0] is None else kt.shape,
                                   dtype=kt.dtype) for kt in model.inputs]
            self._concrete = tf.function(lambda *xs: model(list(xs), training=False)).get_concrete_function(*specs)
        except Exception:  # a model the signature cannot describe: the polymorphic function serves it
            self._concrete = None

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [t for t in self.input_names if t not in tensors]
        if missing:
            raise SplitError(f"part {self.model.name} is missing input {missing[0]!r}")
        xs = [tensors[t] for t in self.input_names]
        outs = None
        if self._concrete is not None:
            try:
                outs = self._concrete(*xs)
            except (TypeError, ValueError):
                outs = None
        if outs is None:
            outs = self._fn(xs)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return {name: np.asarray(o) for name, o in zip(self.output_names, outs)}
