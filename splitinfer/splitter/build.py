"""Loading source models, building parts as keras.Models by replaying graph nodes, saving and running them."""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import warnings
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
    PartFile,
    SourceModel,
    file_sha256,
)
from splitinfer.splitter.keras_parts import LAYER_PACKAGES, CompiledPart, load_part_model
from splitinfer.splitter.partition import PartSpec, split_id_of, split_manifest
from splitinfer.splitter.runtimes import load_parts
from splitinfer.splitter.tensors import random_array, tensor_error
from splitinfer.splitter.verify import compare_split, handed_over, runtime_sets

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
            with fresh_auto_names():
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


def load_graph(spec: str, input_shape: Sequence[int] | None = None, seed: int = 0):
    """The tensor graph of a source model: an OnnxGraph for an `.onnx` file, else a ModelGraph (load_source_model)."""
    if spec.endswith(".onnx"):
        from splitinfer.splitter.onnx_graph import OnnxGraph, load_onnx_model

        return OnnxGraph(load_onnx_model(spec, input_shape), name=Path(spec).stem)
    return ModelGraph(load_source_model(spec, input_shape, seed=seed))


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


def fresh_auto_names():
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


def save_split_on_runtimes(graph: ModelGraph, parts: Sequence[PartSpec], out_dir: Path, origin: str,
                           runtimes: Mapping[str, str | None]) -> Manifest:
    """save_split with each part also exported for the runtime chosen for it (part name -> runtime; "tf" or None:
    the Keras file alone), that runtime named in the manifest when its export worked (else the server runs the
    part on what it has): how a plan's parts are saved, each on the runtime the planner priced it on."""
    from splitinfer.splitter.manifest import RUNTIME_FORMATS

    chosen = {p.name: runtimes.get(p.name) or "tf" for p in parts}
    exports = {name: [RUNTIME_FORMATS[r]] for name, r in chosen.items() if r != "tf"}
    manifest = save_split(graph, parts, out_dir, origin, exports=exports)
    for part in manifest.parts:
        part.runtime = chosen[part.name] if chosen[part.name] in part.runtimes else None
    manifest.save(Path(out_dir))
    return manifest


def save_split(
    graph: ModelGraph,
    parts: Sequence[PartSpec],
    out_dir: Path,
    origin: str,
    progress: Callable[[str], None] | None = None,
    exports: Sequence[str] | Mapping[str, Sequence[str]] = (),
) -> Manifest:
    """Build, save and hash every part, save the source model for verify, and write the manifest. `exports`: other
    formats to save each part in too ("onnx", "tflite"), for the runtimes that run them; or per part name."""
    if not isinstance(graph, ModelGraph):
        from splitinfer.splitter.onnx_build import save_onnx_split

        return save_onnx_split(graph, parts, out_dir, origin, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source_hash = model_hash(graph.model)
    files = {}
    for p in parts:
        files[p.name] = save_part(build_part(graph, p), out, p.name,
                                  exports.get(p.name, ()) if isinstance(exports, Mapping) else exports)
        if progress:
            progress(p.name)
    graph.model.save(out / SOURCE_FILE)
    source_packages, _ = layer_packages(graph.model)
    source = SourceModel(name=graph.model.name, sha256=source_hash, origin=origin, file=SOURCE_FILE,
                         file_sha256=file_sha256(out / SOURCE_FILE), packages=source_packages)
    manifest = split_manifest(graph, parts, files, source, split_id_of(source_hash, parts))
    manifest.save(out)
    return manifest


EXPORTERS = {"onnx": lambda model, path: export_onnx(model, path), "tflite": lambda model, path: export_litert(model, path)}


def layer_packages(model: keras.Model) -> tuple[list[str], list[str]]:
    """(allow-listed packages its layers come from, other modules its layers come from)."""
    roots = {type(layer).__module__.split(".")[0] for layer in _all_layers(model)}
    roots -= {"keras", "splitinfer"}
    return sorted(roots & set(LAYER_PACKAGES)), sorted(roots - set(LAYER_PACKAGES))


def _all_layers(model) -> list:
    found, stack = [], list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        found.append(layer)
        stack.extend(getattr(layer, "layers", None) or [])
        stack.extend(getattr(layer, "_layers", None) or [])
    return found


def _reload_problem(model: keras.Model, path: Path, foreign: list[str]) -> str | None:
    """Why the saved .keras would not load on a server as the model it came from (None if it does): a layer
    of a module a server cannot import by name, a config the layer's own from_config rejects (keras-hub's
    ViTPatchingAndEmbedding), or a reloaded model that computes something else."""
    if foreign:
        return f"its layers come from {', '.join(foreign)}, which a server does not import"
    try:
        loaded = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the answer
        return error_line(exc)
    xs = [random_array(np.random.default_rng(0), [1 if d is None else d for d in kt.shape], kt.dtype)
          for kt in model.inputs]
    xs = _as_called(model, xs)
    try:
        want, got = tree.flatten(model(xs, training=False)), tree.flatten(loaded(xs, training=False))
    except Exception as exc:  # noqa: BLE001
        return error_line(exc)
    if any(tensor_error(np.asarray(g), np.asarray(w)) > 1e-5 for g, w in zip(got, want)):
        return "the reloaded part computes something else"
    return None


def save_part(model: keras.Model, out: Path, name: str, exports: Sequence[str] = ()) -> dict:
    """Save one part as `<name>.keras`, checked to reload as itself; one that does not (see _reload_problem) is
    saved as ONNX instead, which depends on no layer config. Returns the PartEntry fields for its files."""
    packages, foreign = layer_packages(model)
    unknown = [f for f in exports if f not in EXPORTERS]
    if unknown:
        raise SplitError(f"unknown export format {unknown[0]!r}: use {', '.join(EXPORTERS)}")
    path = out / f"{name}.keras"
    model.save(path)
    problem = _reload_problem(model, path, foreign)
    fields: dict = {"file": path.name, "sha256": file_sha256(path), "format": "keras", "packages": packages}
    if problem is not None:
        path.unlink()
        onnx_path = out / f"{name}.onnx"
        try:
            export_onnx(model, onnx_path)
        except SplitError as exc:
            raise SplitError(f"part {name} does not reload from .keras ({problem}) and {exc}") from None
        fields = {"file": onnx_path.name, "sha256": file_sha256(onnx_path), "format": "onnx", "packages": [],
                  "note": f"saved as ONNX: its .keras does not reload ({problem})"}
    fields["exports"] = {}
    for fmt in exports:
        if fmt == fields["format"]:
            continue
        target = out / f"{name}.{fmt}"
        EXPORTERS[fmt](model, target)
        fields["exports"][fmt] = PartFile(file=target.name, sha256=file_sha256(target))
    return fields


def _as_called(model: keras.Model, values: list):
    """Values for the model's inputs in the structure it was built with (a list of one, for a part)."""
    return tree.pack_sequence_as(model._inputs_struct, values)


def export_litert(model: keras.Model, path: Path) -> Path:
    """A Keras model as a LiteRT (.tflite) flatbuffer, for the litert runtime of phone-class devices."""
    path = Path(path)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model.export(str(path), format="litert", verbose=False)
    except Exception as exc:  # noqa: BLE001 - the converter fails in many ways on ops it cannot convert
        raise SplitError(f"cannot convert {model.name} to LiteRT: {error_line(exc)}") from None
    return path


def export_onnx(model: keras.Model, path: Path) -> Path:
    """A Keras model as an ONNX file (Keras's own export, through tf2onnx), its free batch dimension kept, for
    the onnxruntime runtime. Keras exports only a model that has been called, so it is called once first."""
    path = Path(path)
    if not getattr(model, "_called", False):
        shapes = [[1 if d is None else d for d in kt.shape] for kt in model.inputs]
        model(_as_called(model, [np.zeros(s, kt.dtype) for s, kt in zip(shapes, model.inputs)]), training=False)
    quiet = [logging.getLogger(name) for name in ("tf2onnx", "tensorflow")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.CRITICAL)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export(str(path), format="onnx", verbose=False)
    except Exception as exc:  # noqa: BLE001 - tf2onnx fails in many ways on ops it cannot convert
        raise SplitError(f"cannot export {model.name} to ONNX: {error_line(exc)}") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    _captures_as_weights(model, path)
    return path


def _captures_as_weights(model: keras.Model, path: Path) -> None:
    """tf2onnx turns a constant tensor a layer made eagerly and its call captures (keras-hub's position ids) into
    an extra graph input; put its value in as a weight, so the file takes the model's inputs only."""
    import onnx
    from keras.src.export.export_utils import get_input_signature, make_tf_tensor_spec
    from keras.src.export.onnx import get_concrete_fn

    exported = onnx.load(str(path))
    extra = [i.name for i in exported.graph.input][len(model.inputs):]
    if not extra:
        return
    signature = tree.map_structure(make_tf_tensor_spec, get_input_signature(model))
    fn = get_concrete_fn(model, signature)
    fn = fn.get_concrete_function(*signature) if hasattr(fn, "get_concrete_function") else fn
    values = {t.name: v for t, v in zip(fn.graph.internal_captures, fn.captured_inputs) if v.dtype != tf.resource}
    missing = [name for name in extra if name not in values]
    if missing:
        raise SplitError(f"cannot export {model.name} to ONNX: it takes {missing[0]!r} besides the model's inputs")
    from onnx import numpy_helper

    kept = [i for i in exported.graph.input if i.name not in extra]
    del exported.graph.input[:]
    exported.graph.input.extend(kept)
    exported.graph.initializer.extend(numpy_helper.from_array(np.asarray(values[n]), n) for n in extra)
    onnx.save(exported, str(path))


def full_model_outputs(model: keras.Model, manifest: Manifest, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The unsplit model's outputs on the same inputs, keyed by the manifest's final tensor names."""
    xs = ModelGraph(model).model_inputs([inputs[t.name] for t in manifest.inputs])
    result = model(xs, training=False)
    flat = tree.flatten(result)
    return {t.name: np.asarray(v) for t, v in zip(manifest.outputs, flat)}




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
    """Compose the saved parts as the manifest says, on every runtime they have files for, and compare every tensor
    they hand over with the saved source model's (splitter.verify.compare_split)."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    if manifest.source.file is None:
        raise SplitError(f"{directory} has no source model to verify against")
    source_path = directory / manifest.source.file
    if not source_path.exists():
        raise SplitError(f"source model missing: {source_path}")
    if manifest.source.file_sha256 and file_sha256(source_path) != manifest.source.file_sha256:
        raise SplitError(f"source model {source_path} does not match the manifest's sha256")
    if manifest.source.format == "onnx":
        from splitinfer.splitter.onnx_build import verify_onnx_split

        return verify_onnx_split(directory, manifest, source_path, samples, seed, batch)
    source = load_part_model(source_path, packages=manifest.source.packages)
    graph = ModelGraph(source)
    tensors = handed_over(manifest)
    unknown = [t for t in tensors + graph.inputs if t not in graph.tensors]
    if unknown or [t.name for t in manifest.inputs] != graph.inputs:
        raise SplitError(f"manifest names tensor {unknown[:1] or manifest.inputs[0].name!r} the source model lacks")
    missing = [t for t in manifest.output_names if t not in tensors]
    if missing:
        raise SplitError(f"no part produces the final output {missing[0]!r}")
    probe_spec = PartSpec("probe", graph.compute_nodes, graph.inputs, tensors)
    reference = CompiledPart(build_part(graph, probe_spec), graph.inputs, tensors)
    whole = _SourceCall(graph, manifest.output_names)
    parts = {runtime: load_parts(directory, manifest, runtime) for runtime in runtime_sets(manifest)}
    return compare_split(manifest, parts, reference, whole, samples, seed, batch, error_line)
