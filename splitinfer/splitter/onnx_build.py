"""Parts of an ONNX model as self-contained ONNX models: each part's nodes, the weights they read, its inputs
and outputs with the source's value infos (so dynamic batch dimensions stay dynamic), the source's opsets and
functions; each checked with the ONNX checker, saved with the same manifest as a Keras split, and verified on ONNX
Runtime against the source."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.manifest import (
    ONNX_SOURCE_FILE,
    Manifest,
    SourceModel,
    file_sha256,
)
from splitinfer.splitter.onnx_graph import OnnxGraph, load_onnx_model
from splitinfer.splitter.partition import PartSpec, split_id_of, split_manifest
from splitinfer.splitter.runtimes import OnnxPart, load_parts
from splitinfer.splitter.verify import compare_split, handed_over, runtime_sets


def _value_info(graph: OnnxGraph, tensor: str) -> onnx.ValueInfoProto:
    """The source's own value info of a tensor (its symbolic dimensions kept), or one made from what is known."""
    for v in [*graph.model.graph.input, *graph.model.graph.value_info, *graph.model.graph.output]:
        if v.name == tensor and v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            return v
    info = graph.tensors[tensor]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype))
    dims = [d if d is not None else f"{'batch' if i == 0 else f'd{i}'}" for i, d in enumerate(info.shape)]
    return helper.make_tensor_value_info(tensor, elem, dims if info.shape else None)


def build_onnx_part(graph: OnnxGraph, spec: PartSpec) -> onnx.ModelProto:
    """The part's nodes as an ONNX model of their own, checked."""
    nodes = [graph.nodes[n].proto for n in spec.nodes]
    weights = list(dict.fromkeys(w for n in spec.nodes for w in graph.nodes[n].weights))
    inside = {t for n in spec.nodes for t in graph.nodes[n].outputs} - set(spec.outputs)
    value_info = [v for v in graph.model.graph.value_info if v.name in inside]
    part_graph = helper.make_graph(
        nodes, spec.name, [_value_info(graph, t) for t in spec.inputs], [_value_info(graph, t) for t in spec.outputs],
        initializer=[graph.weights[w] for w in weights], value_info=value_info)
    source = graph.model
    part = helper.make_model(part_graph, opset_imports=list(source.opset_import), ir_version=source.ir_version,
                             producer_name="splitinfer", functions=list(source.functions))
    try:
        onnx.checker.check_model(part, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise SplitError(f"part {spec.name} fails the ONNX checker: {str(exc).strip().splitlines()[0][:300]}") from None
    return part


def save_onnx_split(graph: OnnxGraph, parts: Sequence[PartSpec], out_dir: Path, origin: str,
                    progress: Callable[[str], None] | None = None) -> Manifest:
    """Build, save and hash every part, save the source model for verify, and write the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for p in parts:
        fname = f"{p.name}.onnx"
        onnx.save(build_onnx_part(graph, p), out / fname)
        files[p.name] = {"file": fname, "sha256": file_sha256(out / fname), "format": "onnx"}
        if progress:
            progress(p.name)
    onnx.save(graph.model, out / ONNX_SOURCE_FILE)
    source = SourceModel(name=graph.name, sha256=graph.model_hash, origin=origin, format="onnx",
                         file=ONNX_SOURCE_FILE, file_sha256=file_sha256(out / ONNX_SOURCE_FILE))
    manifest = split_manifest(graph, parts, files, source, split_id_of(graph.model_hash, parts))
    manifest.save(out)
    return manifest


def reference_session(graph: OnnxGraph, outputs: Sequence[str], threads: int | None = None) -> OnnxPart:
    """The source model on ONNX Runtime giving `outputs` (any of its tensors), for verify and the profiler."""
    probe = onnx.ModelProto.FromString(graph.model.SerializeToString())
    del probe.graph.output[:]
    probe.graph.output.extend(_value_info(graph, t) for t in outputs)
    return OnnxPart(probe.SerializeToString(), graph.inputs, list(outputs), threads, label=graph.name)


def verify_onnx_split(directory: Path, manifest: Manifest, source_path: Path, samples: int, seed: int,
                      batch: int) -> dict:
    graph = OnnxGraph(load_onnx_model(source_path))
    tensors = handed_over(manifest)
    unknown = [t for t in tensors + [t.name for t in manifest.inputs] if t not in graph.tensors]
    if unknown or [t.name for t in manifest.inputs] != graph.inputs:
        raise SplitError(f"manifest names tensor {unknown[:1] or manifest.inputs[0].name!r} the source model lacks")
    reference = reference_session(graph, tensors)
    whole = reference_session(graph, graph.outputs)
    parts = {runtime: load_parts(directory, manifest, runtime) for runtime in runtime_sets(manifest)}
    return compare_split(manifest, parts, reference, whole, samples, seed, batch,
                         error_line=lambda exc: str(exc).strip().splitlines()[0][:300])

