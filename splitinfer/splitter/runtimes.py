"""The runtimes a part runs on, behind one call: `load_part(directory, entry, runtime)` gives a callable from
tensors (by name) to tensors (by name), whatever the part's file format.

- `tf`: a .keras part as one traced tf.function (build.CompiledPart; thread pools set process-wide, configure_tf);
- `onnxruntime`: an .onnx part (split from an ONNX model, or a Keras part exported to ONNX) in an ONNX Runtime
  session with `threads` intra-op threads; ONNX Runtime releases the GIL while it runs;
- `litert`: a .tflite part (a Keras part converted for phone-class devices) in a LiteRT interpreter, if the
  `ai-edge-litert` wheel is installed.

An exported file's inputs and outputs keep the part's order, not always its names (a Keras export names them
after its Input layers): they are matched by name where they agree, by position otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.manifest import RUNTIME_FORMATS, Manifest, PartEntry, file_sha256


@functools.cache
def _installed() -> tuple[str, ...]:
    import importlib.util

    found = ["tf"]
    if importlib.util.find_spec("onnxruntime") is not None:
        found.append("onnxruntime")
    if importlib.util.find_spec("ai_edge_litert") is not None:
        found.append("litert")
    return tuple(found)


def available_runtimes() -> list[str]:
    """The runtimes this process can load (tf always; the others when their package is installed)."""
    return list(_installed())


def _same_count(file_names: Sequence[str], part_names: Sequence[str], what: str, label: str) -> list[str]:
    """The file's tensor names, refused when they are not as many as the manifest's."""
    if len(file_names) != len(part_names):
        raise SplitError(f"{label} has {len(file_names)} {what}, the manifest names {len(part_names)}")
    return list(file_names)


class OnnxPart:
    """A part in an ONNX Runtime session (all graph optimisations, CPU, sequential execution)."""

    runtime = "onnxruntime"

    def __init__(self, model: str | Path | bytes, input_names: Sequence[str], output_names: Sequence[str],
                 threads: int | None = None, label: str = "part"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = max(0, int(threads or 0))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # no busy-waiting between calls: servers share few cores, and a spinning pool bills others for its time
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT's Fail/InvalidGraph: one line
            raise SplitError(f"ONNX Runtime cannot load {label}: {str(exc).strip().splitlines()[0][:300]}") from None
        self.name = label
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self._feeds = _same_count([i.name for i in self.session.get_inputs()], self.input_names, "inputs", label)
        self._fetches = _same_count([o.name for o in self.session.get_outputs()], self.output_names, "outputs",
                                        label)
        if set(self._feeds) == set(self.input_names):
            self._feeds = list(self.input_names)
        if set(self._fetches) == set(self.output_names):
            self._fetches = list(self.output_names)

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [t for t in self.input_names if t not in tensors]
        if missing:
            raise SplitError(f"part {self.name} is missing input {missing[0]!r}")
        feeds = {f: np.ascontiguousarray(tensors[t]) for f, t in zip(self._feeds, self.input_names)}
        outs = self.session.run(self._fetches, feeds)
        return dict(zip(self.output_names, outs))


class LiteRtPart:
    """A part in a LiteRT interpreter, resized to each call's batch."""

    runtime = "litert"

    def __init__(self, path: str | Path, input_names: Sequence[str], output_names: Sequence[str],
                 threads: int | None = None, label: str = "part"):
        from ai_edge_litert.interpreter import Interpreter

        self.name = label
        self._interpreter = Interpreter(model_path=str(path), num_threads=max(1, int(threads or 1)))
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self._inputs = self._interpreter.get_input_details()
        self._outputs = self._interpreter.get_output_details()
        _same_count([d["name"] for d in self._inputs], self.input_names, "inputs", label)
        _same_count([d["name"] for d in self._outputs], self.output_names, "outputs", label)
        self._shapes: tuple | None = None

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        xs = [np.ascontiguousarray(tensors[t]) for t in self.input_names]
        shapes = tuple(x.shape for x in xs)
        if shapes != self._shapes:
            for detail, x in zip(self._inputs, xs):
                self._interpreter.resize_tensor_input(detail["index"], x.shape)
            self._interpreter.allocate_tensors()
            self._shapes = shapes
        for detail, x in zip(self._inputs, xs):
            self._interpreter.set_tensor(detail["index"], x)
        self._interpreter.invoke()
        return {name: self._interpreter.get_tensor(d["index"]) for name, d in zip(self.output_names, self._outputs)}


def load_part(directory: Path, entry: PartEntry, runtime: str | None = None, threads: int | None = None):
    """The part on `runtime` (default: the one its entry names), from the file of that runtime's format, its
    sha256 checked against the manifest."""
    runtime = runtime or entry.runtime_name
    if runtime not in RUNTIME_FORMATS:
        raise SplitError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIME_FORMATS)}")
    ref = entry.file_for(runtime)
    path = Path(directory) / ref.file
    if not path.exists():
        raise SplitError(f"part file missing: {path}")
    if not path.is_file():
        raise SplitError(f"part file {path} is not a file")
    if file_sha256(path) != ref.sha256:
        raise SplitError(f"part file {path} does not match the manifest's sha256")
    inputs, outputs = [t.name for t in entry.inputs], [t.name for t in entry.outputs]
    if runtime == "onnxruntime":
        return OnnxPart(path, inputs, outputs, threads, label=entry.name)
    if runtime == "litert":
        if "litert" not in available_runtimes():
            raise SplitError(f"part {entry.name} runs on litert: install the ai-edge-litert package")
        return LiteRtPart(path, inputs, outputs, threads, label=entry.name)
    from splitinfer.splitter.keras_parts import CompiledPart, load_part_model  # lazy: loads TensorFlow

    return CompiledPart(load_part_model(path, packages=entry.packages), inputs, outputs)


def load_parts(directory: Path, manifest: Manifest, runtime: str | None = None, threads: int | None = None) -> list:
    """Every part on `runtime` where it has a file for it, on its own runtime otherwise (None: each its own)."""
    return [load_part(directory, e, runtime if runtime in e.runtimes else None, threads) for e in manifest.parts]
