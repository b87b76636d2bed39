"""Loading source models, building parts as keras.Models by replaying graph nodes, saving and running them."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from splitinfer import _tf  # noqa: F401  (quiet TF before keras imports it)
import keras
import tensorflow as tf
from keras import tree
from keras.src.backend.common import global_state

from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.graph import ModelGraph, RestoreMask, error_line, model_hash
from splitinfer.splitter.manifest import (
    APPLICATIONS_PREFIX,
    SOURCE_FILE,
    Manifest,
    PartEntry,
    PartOutput,
    SourceModel,
    TensorSpec,
    file_sha256,
)
from splitinfer.splitter.partition import PartSpec

DEFAULT_INPUT_SHAPE = (224, 224, 3)
def load_source_model(spec: str, input_shape: Sequence[int] | None = None, seed: int = 0) -> keras.Model:
    """A `.keras` file (loaded with safe_mode=True) or `keras.applications:NAME` built with weights=None."""
    if spec.startswith(APPLICATIONS_PREFIX):
        name = spec[len(APPLICATIONS_PREFIX):]
        ctor = getattr(keras.applications, name, None)
        if not callable(ctor) or name.startswith("_") or not name[:1].isupper():
            raise SplitError(f"unknown model {spec!r}: keras.applications has no {name!r}")
        shape = tuple(input_shape or DEFAULT_INPUT_SHAPE)
        keras.utils.set_random_seed(seed)
        try:
            with _fresh_auto_names():
                return ctor(weights=None, input_shape=shape)
        except (ValueError, TypeError) as exc:
            raise SplitError(f"cannot build {name} with input shape {shape}: {error_line(exc)}") from None
    path = Path(spec)
    if not path.exists():
        raise SplitError(f"model file not found: {spec}")
    if path.is_dir() or path.suffix != ".keras":
        raise SplitError(f"{spec} is not a .keras file (or use keras.applications:NAME)")
    if not zipfile.is_zipfile(path):
        raise SplitError(f"{spec} is not a valid .keras file (not a zip archive)")
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # keras raises many types for a bad archive; one line is what the user needs
        raise SplitError(f"cannot load {spec}: {error_line(exc)}") from None
    if input_shape is not None:
        model = _at_input_shape(model, tuple(input_shape), spec)
    return model


def _at_input_shape(model: keras.Model, shape: tuple[int, ...], spec: str) -> keras.Model:
    """The model with its input fixed to `shape`: itself if it already is, else rebuilt from its config at that
    shape with the same weights (a model saved with free dimensions, e.g. (None, None, 3))."""
    inputs = list(getattr(model, "inputs", None) or [])
    if len(inputs) != 1:
        raise SplitError(f"--input-shape sets the shape of a single input; {spec} has {len(inputs)} inputs")
    declared = tuple(inputs[0].shape[1:])
    if len(declared) != len(shape) or any(d is not None and d != s for d, s in zip(declared, shape)):
        raise SplitError(f"{spec} takes inputs of shape {declared}, not {shape}")
    if None not in declared:
        return model
    serialized = keras.saving.serialize_keras_object(model)
    input_name = inputs[0]._keras_history.operation.name
    input_layers = [
        layer for layer in serialized.get("config", {}).get("layers", [])
        if layer.get("class_name") == "InputLayer" and layer.get("config", {}).get("name") == input_name
    ]
    if len(input_layers) != 1:
        raise SplitError(f"cannot fix the free input dimensions of {spec} ({declared}); save it at a fixed shape")
    input_layers[0]["config"]["batch_shape"] = [None, *shape]
    try:
        fixed = keras.saving.deserialize_keras_object(serialized, safe_mode=True)
        fixed.set_weights(model.get_weights())
    except Exception as exc:  # noqa: BLE001 - a layer that cannot take this shape; one line is what the user needs
        raise SplitError(f"cannot build {spec} with input shape {shape}: {error_line(exc)}") from None
    return fixed


@contextlib.contextmanager
def _auto_name_counters(uids):
    """Keras numbers the ops it names on its own (`input_layer_14`, `add_3`) from process-wide counters: use `uids`
    as those counters for the duration, then put the process's back."""
    saved = global_state.get_global_attribute("object_name_uids")
    global_state.set_global_attribute("object_name_uids", uids)
    try:
        yield
    finally:
        global_state.set_global_attribute("object_name_uids", saved)


def _fresh_auto_names():
    """Build as a fresh process would, so that the tensor names of `keras.applications:NAME` do not depend on what
    the process built before."""
    return _auto_name_counters(collections.defaultdict(int))


def _input_name(tensor: str) -> str:
    return "in_" + re.sub(r"[^A-Za-z0-9_]", "_", tensor)


def _auto_names_clear_of(names):
    """Keras names the ops it makes on its own (a layer's compute_mask: `not_equal`, `not_equal_1`) from a process-wide
    counter, which knows nothing of the names a loaded model already uses; a part holding both would be refused
    ("the name ... is used 2 times"). Move the counters past every name in `names` while a part is built."""
    uids = collections.defaultdict(int, global_state.get_global_attribute("object_name_uids") or {})
    for name in names:
        uids[name] = max(uids[name], 1)
        m = re.fullmatch(r"(.+)_(\d+)", name)
        if m:
            uids[m.group(1)] = max(uids[m.group(1)], int(m.group(2)) + 1)
    return _auto_name_counters(uids)


def build_part(graph: ModelGraph, spec: PartSpec) -> keras.Model:
    """Replay the part's nodes on fresh Inputs, reusing the original operations (and so their weights)."""
    with _auto_names_clear_of(graph.operation_names):
        return _build_part(graph, spec)


def _build_part(graph: ModelGraph, spec: PartSpec) -> keras.Model:
    new: dict[str, object] = {}
    inputs = []
    for t in spec.inputs:
        info = graph.tensors[t]
        x = keras.Input(batch_shape=info.shape, dtype=info.dtype, name=_input_name(t))
        new[t] = x
        inputs.append(x)
    # A part input carries no Keras mask; the layers that read one get the input with its mask put back on.
    masked: dict[str, object] = {}
    for t in spec.inputs:
        mask = graph.tensors[t].mask
        if mask in new and any(mask in graph.nodes[n].masks for n in spec.nodes):
            masked[t] = RestoreMask(name=f"{_input_name(t)}_mask")(new[t], mask=new[mask])
    for n in spec.nodes:
        node = graph.nodes[n]
        knode = node.keras_node
        bound = {
            id(kt): masked[name] if name in masked and graph.tensors[name].mask in node.masks else new[name]
            for kt, name in zip(knode.arguments.keras_tensors, node.inputs)
        }
        args, kwargs = knode.arguments.fill_in(bound)
        flat = tree.flatten(node.operation(*args, **kwargs))
        for name, value in zip(node.results, flat):
            new[name] = value
            mask = graph.tensors[name].mask
            if mask is not None:
                new[mask] = getattr(value, "_keras_mask", None)
                if new[mask] is None:
                    raise SplitError(f"{name} lost its Keras mask when part {spec.name} was rebuilt")
    return keras.Model(inputs, [new[t] for t in spec.outputs], name=spec.name)


def split_id_of(source_hash: str, parts: Sequence[PartSpec]) -> str:
    h = hashlib.sha256(source_hash.encode())
    for p in parts:
        h.update(("|".join(p.nodes) + "#").encode())
    return h.hexdigest()[:16]


def save_split(
    graph: ModelGraph,
    parts: Sequence[PartSpec],
    out_dir: Path,
    origin: str,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Build, save and hash every part, save the source model for verify, and write the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source_hash = model_hash(graph.model)
    consumers: dict[str, list[str]] = {}
    for p in parts:
        for t in p.inputs:
            consumers.setdefault(t, []).append(p.name)
    finals = set(graph.outputs)
    entries = []
    for p in parts:
        model = build_part(graph, p)
        fname = f"{p.name}.keras"
        model.save(out / fname)
        entries.append(
            PartEntry(
                name=p.name,
                file=fname,
                sha256=file_sha256(out / fname),
                inputs=[TensorSpec(**graph.tensors[t].to_json()) for t in p.inputs],
                outputs=[
                    PartOutput(**graph.tensors[t].to_json(), consumers=consumers.get(t, []), final=t in finals)
                    for t in p.outputs
                ],
                operations=list(p.nodes),
            )
        )
        if progress:
            progress(p.name)
    graph.model.save(out / SOURCE_FILE)
    manifest = Manifest(
        split_id=split_id_of(source_hash, parts),
        source=SourceModel(
            name=graph.model.name,
            sha256=source_hash,
            origin=origin,
            file=SOURCE_FILE,
            file_sha256=file_sha256(out / SOURCE_FILE),
        ),
        inputs=[TensorSpec(**graph.tensors[t].to_json()) for t in graph.inputs],
        outputs=[TensorSpec(**graph.tensors[t].to_json()) for t in graph.outputs],
        output_keys=graph.output_keys,
        parts=entries,
    )
    manifest.save(out)
    return manifest


def load_part_model(path: Path, expected_sha256: str | None = None) -> keras.Model:
    """Load one saved part with safe_mode=True, refusing a file whose hash does not match the manifest."""
    path = Path(path)
    if not path.exists():
        raise SplitError(f"part file missing: {path}")
    if not path.is_file():
        raise SplitError(f"part file {path} is not a file")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise SplitError(f"part file {path} does not match the manifest's sha256")
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

    @classmethod
    def from_entry(cls, directory: Path, entry: PartEntry) -> "CompiledPart":
        model = load_part_model(Path(directory) / entry.file, entry.sha256)
        return cls(model, [t.name for t in entry.inputs], [t.name for t in entry.outputs])

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


def run_parts(parts: Sequence[CompiledPart], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run parts in manifest (topological) order, each on the tensors produced so far."""
    tensors = dict(inputs)
    for part in parts:
        tensors.update(part(tensors))
    return tensors


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


def full_model_outputs(model: keras.Model, manifest: Manifest, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The unsplit model's outputs on the same inputs, keyed by the manifest's final tensor names."""
    xs = ModelGraph(model).model_inputs([inputs[t.name] for t in manifest.inputs])
    result = model(xs, training=False)
    flat = tree.flatten(result)
    return {t.name: np.asarray(v) for t, v in zip(manifest.outputs, flat)}


def tensor_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref|, divided by the reference's magnitude when that exceeds 1 (deep activations grow large)."""
    if ref.size == 0:
        return 0.0
    diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    return diff / max(1.0, float(np.max(np.abs(ref))))


class _SourceCall:
    """The source model called as a whole, compiled like the parts, its flat outputs named as the manifest's."""

    def __init__(self, graph: ModelGraph, output_names: Sequence[str]):
        model = graph.model
        self.input_names = list(graph.inputs)
        self.output_names = list(output_names)
        self._fn = tf.function(lambda xs: tree.flatten(model(graph.model_inputs(xs), training=False)))

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._fn([tensors[t] for t in self.input_names])
        return {name: np.asarray(o) for name, o in zip(self.output_names, outs)}


def verify_split(directory: Path, samples: int = 2, seed: int = 0, batch: int = 1) -> dict:
    """Compose the saved parts as the manifest says and compare with the saved source model.

    Every tensor a part hands over is compared, not only the final outputs: a model with random weights
    often gives the same near-uniform softmax for every input, which would make a final-only check vacuous.
    """
    directory = Path(directory)
    manifest = Manifest.load(directory)
    if manifest.source.file is None:
        raise SplitError(f"{directory} has no source model to verify against")
    source_path = directory / manifest.source.file
    if not source_path.exists():
        raise SplitError(f"source model missing: {source_path}")
    if manifest.source.file_sha256 and file_sha256(source_path) != manifest.source.file_sha256:
        raise SplitError(f"source model {source_path} does not match the manifest's sha256")
    source = load_part_model(source_path)
    parts = [CompiledPart.from_entry(directory, e) for e in manifest.parts]
    graph = ModelGraph(source)
    handed_over = list(dict.fromkeys(o.name for p in manifest.parts for o in p.outputs))
    unknown = [t for t in handed_over + graph.inputs if t not in graph.tensors]
    if unknown or [t.name for t in manifest.inputs] != graph.inputs:
        raise SplitError(f"manifest names tensor {unknown[:1] or manifest.inputs[0].name!r} the source model lacks")
    missing = [t for t in manifest.output_names if t not in handed_over]
    if missing:
        raise SplitError(f"no part produces the final output {missing[0]!r}")
    probe_spec = PartSpec("probe", graph.compute_nodes, graph.inputs, handed_over)
    reference = CompiledPart(build_part(graph, probe_spec), graph.inputs, handed_over)
    whole = _SourceCall(graph, manifest.output_names)
    finals = set(manifest.output_names)
    errors = {t: 0.0 for t in handed_over}
    spread = {t: 0.0 for t in manifest.output_names}
    previous: dict[str, np.ndarray] = {}
    for s in range(samples):
        inputs = random_inputs(manifest.inputs, batch, seed + s)
        try:
            got = run_parts(parts, inputs)
            want = reference(inputs)
            whole_outputs = whole(inputs)
        except SplitError:
            raise
        except Exception as exc:  # noqa: BLE001 - a model that cannot run on these inputs; say why in one line
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
            free = any(d is None for t in manifest.inputs for d in t.shape[1:])
            hint = " (its inputs have free dimensions, filled with 1: split it with --input-shape)" if free else ""
            raise SplitError(f"cannot run the split on random inputs {shapes}{hint}: {error_line(exc)}") from None
        # The final outputs also against the source model's own call, not only against our replay of its graph.
        for name, ref in whole_outputs.items():
            if got[name].shape != ref.shape:
                raise SplitError(f"{name!r} has shape {got[name].shape}, the full model gives {ref.shape}")
            errors[name] = max(errors[name], tensor_error(got[name], ref))
        for name, ref in want.items():
            if name not in got:
                raise SplitError(f"no part produces {name!r}")
            if got[name].shape != ref.shape:
                raise SplitError(f"{name!r} has shape {got[name].shape}, the full model gives {ref.shape}")
            errors[name] = max(errors[name], tensor_error(got[name], ref))
            if name in finals and name in previous:
                diff = previous[name].astype(np.float64) - ref.astype(np.float64)
                spread[name] = max(spread[name], float(np.max(np.abs(diff), initial=0.0)))
            previous[name] = ref
    return {
        "split_id": manifest.split_id,
        "model": manifest.source.name,
        "parts": len(manifest.parts),
        "samples": samples,
        "tensors_compared": len(handed_over),
        "max_abs_error": max(errors.values(), default=0.0),
        "per_output": {t: errors[t] for t in manifest.output_names},
        "max_handover_error": max((e for t, e in errors.items() if t not in finals), default=0.0),
        "output_spread": spread,
    }
