"""The deployment manifest: the one JSON document that says what each part takes, gives and who consumes it.
Loads without TensorFlow, like the shape parsing and file hashing next to it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from splitinfer.messages import MessageError, check_tensor

from splitinfer.splitter.errors import SplitError

MANIFEST_FORMAT = "splitinfer.manifest"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
SOURCE_FILE = "source.keras"
ONNX_SOURCE_FILE = "source.onnx"
# what a part file is, and the runtime that runs each format (a server runs a part on the runtime its entry names,
# from the file of that runtime's format: the part's own, or one of its exports)
PART_FORMATS = ("keras", "onnx", "tflite")
RUNTIME_FORMATS = {"tf": "keras", "onnxruntime": "onnx", "litert": "tflite"}
DEFAULT_RUNTIME = {fmt: runtime for runtime, fmt in RUNTIME_FORMATS.items()}
APPLICATIONS_PREFIX = "keras.applications:"  # a source model's origin: a .keras path, or this + a keras.applications name
MAX_INPUT_ELEMENTS = 2**31 - 1  # per sample: TensorFlow kernels index tensors with int32


class TensorSpec(BaseModel):
    name: str
    shape: list[int | None]
    dtype: str


class PartOutput(TensorSpec):
    consumers: list[str] = Field(default_factory=list, description="parts that take this tensor as input")
    final: bool = Field(False, description="a final output of the model")
    codec: str | None = Field(
        None, description="sent compressed with this codec (messages.CODECS); the receiver restores the dtype")


class PartFile(BaseModel):
    file: str
    sha256: str


class PartEntry(BaseModel):
    name: str
    file: str
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[PartOutput]
    operations: list[str]
    format: Literal["keras", "onnx", "tflite"] = Field("keras", description="the format of `file`")
    exports: dict[str, PartFile] = Field(
        default_factory=dict, description="the same part in other formats (format -> file), for other runtimes")
    runtime: Literal["tf", "onnxruntime", "litert"] | None = Field(
        None, description="the runtime servers run it on; None: its format's own (tf for keras, ...)")
    runtime_ms: dict[str, float] = Field(
        default_factory=dict, description="its latency at batch 1 on each runtime, measured where it was split")
    packages: list[str] = Field(
        default_factory=list, description="allow-listed packages whose layers it needs imported (build.LAYER_PACKAGES)")
    note: str | None = Field(None, description="why it is saved as it is, when that is not the default")

    @property
    def runtime_name(self) -> str:
        return self.runtime or DEFAULT_RUNTIME[self.format]

    @property
    def runtimes(self) -> list[str]:
        """Every runtime a file of this part can run on."""
        formats = [self.format, *self.exports]
        return [r for r, fmt in RUNTIME_FORMATS.items() if fmt in formats]

    def file_for(self, runtime: str | None = None) -> PartFile:
        """The file the runtime runs (the part's own, or its export in that runtime's format)."""
        runtime = runtime or self.runtime_name
        fmt = RUNTIME_FORMATS.get(runtime)
        if fmt == self.format:
            return PartFile(file=self.file, sha256=self.sha256)
        if fmt in self.exports:
            return self.exports[fmt]
        raise SplitError(f"part {self.name} has no {fmt or runtime} file for runtime {runtime} "
                         f"(it runs on {', '.join(self.runtimes)})")

    def files(self) -> list[PartFile]:
        """Every file of the part: its own, then its exports."""
        return [PartFile(file=self.file, sha256=self.sha256), *self.exports.values()]


class SourceModel(BaseModel):
    name: str
    sha256: str = Field(description="model_hash: architecture and weights")
    origin: str = Field(description="the .keras or .onnx path or keras.applications:NAME it came from")
    format: Literal["keras", "onnx"] = "keras"
    packages: list[str] = Field(default_factory=list, description="allow-listed packages its layers need imported")
    file: str | None = Field(SOURCE_FILE, description="the full model saved next to the parts, for verify")
    file_sha256: str | None = None


class Manifest(BaseModel):
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION
    split_id: str
    source: SourceModel
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    output_keys: list[str] | None = None
    parts: list[PartEntry]

    def part(self, name: str) -> PartEntry:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def check_inputs(self, arrays: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
        """A job's inputs against what the deployment takes: every input by name, its dtype and shape, one batch
        size of at least 1. None when fine, else (code, one-line reason): `bad_inputs`, `wrong_dtype`,
        `wrong_shape`."""
        want = [t.name for t in self.inputs]
        missing = [n for n in want if n not in arrays]
        extra = [n for n in arrays if n not in want]
        if missing or extra:
            return "bad_inputs", f"the deployment takes inputs {want}; missing {missing}, unexpected {extra}"
        batch = None
        for spec in self.inputs:
            arr = arrays[spec.name]
            try:
                check_tensor(arr, spec.shape, spec.dtype, name=f"input {spec.name}")
            except MessageError as exc:
                return exc.code, exc.reason
            if arr.ndim and batch is not None and arr.shape[0] != batch:
                return "wrong_shape", f"input {spec.name}: batch {arr.shape[0]}, other inputs have {batch}"
            batch = arr.shape[0] if arr.ndim else batch
        if batch == 0:
            return "wrong_shape", "inputs have an empty batch"
        return None

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory)
        if path.is_dir():
            path = path / MANIFEST_FILE
        if not path.exists():
            raise SplitError(f"no manifest at {path}")
        if not path.is_file():
            raise SplitError(f"manifest {path} is not a file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SplitError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as exc:
            errors = exc.errors()
            first = errors[0] if errors else {"loc": (), "msg": str(exc)}
            where = ".".join(str(p) for p in first.get("loc", ()))
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise SplitError(f"invalid manifest {path}: {where + ': ' if where else ''}{first['msg']}{more}") from None
        except ValueError as exc:
            raise SplitError(f"invalid manifest {path}: {str(exc).splitlines()[0][:300]}") from None
        if manifest.format != MANIFEST_FORMAT or manifest.version != MANIFEST_VERSION:
            raise SplitError(f"{path} is {manifest.format} v{manifest.version}, expected {MANIFEST_FORMAT} v{MANIFEST_VERSION}")
        files = [f.file for p in manifest.parts for f in p.files()]
        files += [manifest.source.file] if manifest.source.file else []
        bad = [f for f in files if not f or f != Path(f).name or f in (".", "..")]
        if bad:
            raise SplitError(
                f"invalid manifest {path}: file {bad[0]!r} is not a plain file name in the split directory"
            )
        bad_runtime = [p for p in manifest.parts if p.runtime is not None and RUNTIME_FORMATS[p.runtime] not in
                       (p.format, *p.exports)]
        if bad_runtime:
            p = bad_runtime[0]
            raise SplitError(f"invalid manifest {path}: part {p.name} runs on {p.runtime} but has no "
                             f"{RUNTIME_FORMATS[p.runtime]} file")
        return manifest


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """`224x224x3` (or `224,224,3`) -> (224, 224, 3); None -> None (the model's own shape)."""
    if text is None:
        return None
    if not text.strip():
        raise SplitError("input shape is empty; give it like 224x224x3")
    try:
        shape = tuple(int(d) for d in re.split(r"[x,\s]+", text.strip()) if d)
    except ValueError:
        raise SplitError(f"input shape {text!r} is not a list of integers like 224x224x3") from None
    if not shape or any(d <= 0 for d in shape):
        raise SplitError(f"input shape {text!r} must have positive dimensions")
    if np.prod(shape, dtype=np.float64) > MAX_INPUT_ELEMENTS:
        raise SplitError(f"input shape {text!r} is too large: more than 2**31 elements per sample")
    return shape
