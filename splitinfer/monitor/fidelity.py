"""What sending a cut tensor compressed costs in fidelity: measured on sample inputs, cached like profiles.

For every candidate cut tensor t (a single-tensor cut point of float dtype) and codec c (messages.CODECS) the
model runs on `samples` random inputs (splitter.build.random_inputs, seeds seed, seed+1, ...) with the value of
t replaced by decompress(compress(value)), exactly what a receiver of a compressed TensorMessage computes, and
the final outputs are compared with the unmodified model's. Every candidate's value and the reference outputs come
from ONE compiled function (the whole model with all candidates and the final outputs as outputs); then, per
candidate, the tail of the model after it (split_at_cuts(graph, [t])[1]) is built and traced once and run on
the compressed values of every sample and codec. Compression is per request message: one int8 scale per sample.

The result feeds the planner: `CompressionProfile.fidelity_table()` is its `Compression` input
(tensor -> {codec: fidelity in (0, 1]}).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from splitinfer.messages import CODECS, MessageError, compress_array, decompress_array
from splitinfer.monitor.document import ModelDocument
from splitinfer.monitor.profile import profile_path
from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.manifest import TensorSpec
from splitinfer.splitter.partition import PartSpec, split_at_cuts

if TYPE_CHECKING:  # TF loads only when measuring
    import keras

    from splitinfer.splitter.graph import ModelGraph

COMPRESSION_FORMAT = "splitinfer.compression"
COMPRESSION_VERSION = 1
MIN_FIDELITY = 1e-6  # a fidelity of 0 would make the planner's log(fidelity) infinite

Metric = Literal["top1_agreement", "max_abs_error"]


class CompressionEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    tensor: str
    codec: str
    max_abs_error: float = Field(description="max |compressed - float model| over samples and final outputs")
    top1_agreement: float = Field(
        description="fraction of samples (every position of the first final output's leading axes) whose argmax "
        "over the last axis matches the float model; 1 - min(1, max_abs_error) when that axis has size 1")
    bytes_saved_fraction: float = Field(description="1 - compressed itemsize / original itemsize")
    cut_error: float = Field(
        0.0, description="at the cut tensor itself: max |restored - value| / max |value| over samples (0 for an "
        "all-zero tensor); 1 when float16 flushes tiny activations to zero, which the final outputs may not show")


class CompressionProfile(ModelDocument):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")
    FORMAT: ClassVar[str] = COMPRESSION_FORMAT
    VERSION: ClassVar[int] = COMPRESSION_VERSION

    format: str = COMPRESSION_FORMAT
    version: int = COMPRESSION_VERSION
    samples: int
    seed: int
    codecs: list[str]
    top1_output: str | None = Field(description="the final output top1_agreement looks at")
    top1_by_error: bool = Field(
        description="that output's last axis has size 1 (or it is a scalar): top1_agreement is 1 - min(1, error)")
    output_spread: float = Field(
        0.0, description="max |difference| of the float model's final outputs between samples; 0 means the outputs "
        "do not depend on the input (random weights whose activations vanish) and the errors above say nothing")
    created: str
    measure_seconds: float
    entries: list[CompressionEntry]

    # -- queries ------------------------------------------------------------------------------

    @property
    def tensors(self) -> list[str]:
        return list(dict.fromkeys(e.tensor for e in self.entries))

    def entry(self, tensor: str, codec: str) -> CompressionEntry:
        for e in self.entries:
            if e.tensor == tensor and e.codec == codec:
                return e
        raise KeyError((tensor, codec))

    def fidelity_table(self, metric: Metric = "top1_agreement") -> dict[str, dict[str, float]]:
        """The planner's `Compression`: tensor -> {codec: fidelity}, each clipped into [MIN_FIDELITY, 1].

        metric "top1_agreement" uses the agreement; "max_abs_error" uses 1 - min(1, max_abs_error)."""
        if metric not in ("top1_agreement", "max_abs_error"):
            raise ValueError(f"unknown fidelity metric {metric!r}: top1_agreement or max_abs_error")
        table: dict[str, dict[str, float]] = {}
        for e in self.entries:
            value = e.top1_agreement if metric == "top1_agreement" else 1.0 - min(1.0, e.max_abs_error)
            if not np.isfinite(value):
                value = 0.0
            table.setdefault(e.tensor, {})[e.codec] = float(min(1.0, max(MIN_FIDELITY, value)))
        return table


# -- measuring ------------------------------------------------------------------------------------


def _candidates(graph, tensors: Sequence[str] | None) -> list[str]:
    points = graph.cut_points()
    if tensors is None:
        return [t for t in points if np.dtype(graph.tensors[t].dtype).kind == "f"]
    point_set = set(points)
    chosen: list[str] = []
    for t in dict.fromkeys(tensors):
        info = graph.tensor(t)  # SplitError naming an unknown tensor
        if t not in point_set:
            raise SplitError(f"tensor {t!r} is not a single-tensor cut point (see `splitinfer cuts`)")
        if np.dtype(info.dtype).kind != "f":
            raise SplitError(f"tensor {t!r} is {info.dtype}: only float tensors can be sent compressed")
        chosen.append(t)
    return chosen


def _codecs(codecs: Sequence[str]) -> list[str]:
    if isinstance(codecs, str):
        codecs = [codecs]
    unknown = [c for c in codecs if c not in CODECS]
    if unknown:
        raise ValueError(f"unknown codec {unknown[0]!r}, expected some of {', '.join(CODECS)}")
    chosen = [c for c in CODECS if c in set(codecs)]  # canonical order: the cache key does not depend on it
    if not chosen:
        raise ValueError("no codec to measure")
    return chosen


def _cache_key(samples: int, seed: int, codecs: list[str], tensors: list[str] | None) -> str:
    """The part of the cache file name profile_path calls the fingerprint: what this measurement depends on
    besides model hash, input shape and batch (not the machine: fidelity is a property of the model)."""
    key = f"fidelity-n{samples}-s{seed}-{'+'.join(codecs)}"
    if tensors is not None:
        key += "-t" + hashlib.sha256("\n".join(tensors).encode()).hexdigest()[:12]
    return key


def _top1(got: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of positions (every index of the leading axes) whose argmax over the last axis agrees."""
    return float(np.mean(np.argmax(got, axis=-1) == np.argmax(ref, axis=-1)))


def _max_err(got: np.ndarray, ref: np.ndarray) -> float:
    if ref.size == 0:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    if np.isnan(diff).any():
        return float("inf")
    return float(np.max(diff))


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    peak = float(np.max(np.abs(ref))) if ref.size else 0.0
    return _max_err(got, ref) / peak if peak > 0.0 else 0.0


def compression_entries(
    graph: ModelGraph,
    tensors: Sequence[str],
    codecs: Sequence[str],
    *,
    samples: int,
    seed: int,
    batch: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[CompressionEntry], dict]:
    """Measure without caching: the entries, and the profile fields that describe the comparison
    (top1_output, top1_by_error, output_spread)."""
    from splitinfer.splitter.build import build_part  # lazy: loads TensorFlow
    from splitinfer.splitter.keras_parts import CompiledPart
    from splitinfer.splitter.tensors import random_inputs

    finals = list(graph.outputs)
    wanted = list(dict.fromkeys([*tensors, *finals]))
    probe_spec = PartSpec("fidelity_probe", graph.compute_nodes, list(graph.inputs), wanted)
    probe = CompiledPart(build_part(graph, probe_spec), probe_spec.inputs, probe_spec.outputs)
    input_specs = [TensorSpec(**graph.tensors[t].to_json()) for t in graph.inputs]
    reference = []
    for s in range(samples):
        inputs = random_inputs(input_specs, batch, seed + s)
        reference.append({**inputs, **probe(inputs)})

    spread = max((_max_err(ref[o], reference[0][o]) for ref in reference[1:] for o in finals), default=0.0)
    top1_output = finals[0] if finals else None
    first_shape = graph.tensors[top1_output].shape if top1_output else ()
    by_error = top1_output is None or len(first_shape) == 0 or first_shape[-1] == 1

    entries: list[CompressionEntry] = []
    for i, t in enumerate(tensors):
        tail_spec = split_at_cuts(graph, [t])[1]
        tail = CompiledPart(build_part(graph, tail_spec), tail_spec.inputs, tail_spec.outputs)
        info = graph.tensors[t]
        notes = []
        for codec in codecs:
            err, cut_err, agree = 0.0, 0.0, []
            for ref in reference:
                value = ref[t]
                try:
                    packed, scale = compress_array(value, codec)
                except MessageError:  # int8 of a tensor holding inf / NaN: this codec cannot carry it
                    err, cut_err, agree = float("inf"), float("inf"), [0.0]
                    break
                restored = decompress_array(packed, codec, scale, value.dtype)
                cut_err = max(cut_err, _rel_err(restored, value))
                values = dict(ref)
                values[t] = restored  # a final output that is also the cut tensor arrives compressed as well
                values.update(tail({name: values[name] for name in tail_spec.inputs}))
                for o in finals:
                    err = max(err, _max_err(values[o], ref[o]))
                if not by_error:
                    agree.append(_top1(values[top1_output], ref[top1_output]))
            if by_error or not np.isfinite(err):
                top1 = 1.0 - min(1.0, err) if err == err else 0.0
            else:
                top1 = float(np.mean(agree)) if agree else 1.0
            original = np.dtype(info.dtype).itemsize
            compressed = np.dtype(np.float16 if codec == "float16" else np.int8).itemsize
            entries.append(CompressionEntry(
                tensor=t, codec=codec, max_abs_error=err, top1_agreement=top1,
                bytes_saved_fraction=1.0 - compressed / original, cut_error=cut_err,
            ))
            notes.append(f"{codec} max err {err:.3g} top1 {top1:.3f} cut err {cut_err:.2g}")
        if progress:
            progress(f"compression {i + 1}/{len(tensors)} {t} {tuple(info.shape)}: " + ", ".join(notes))
    return entries, {"top1_output": top1_output, "top1_by_error": by_error, "output_spread": spread}


def measure_compression(
    graph: ModelGraph | keras.Model,
    tensors: Sequence[str] | None = None,
    codecs: Sequence[str] = CODECS,
    samples: int = 8,
    seed: int = 0,
    batch: int = 1,
    *,
    cache: bool = True,
    refresh: bool = False,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompressionProfile:
    """What compressing each candidate cut tensor with each codec costs, on `samples` random inputs at `batch`.

    `graph`: a splitter ModelGraph (or a keras.Model). `tensors` default to every single-tensor cut point of
    float dtype (`graph.cut_points()`); a named tensor that is not such a cut point is refused (SplitError).
    Per entry: `max_abs_error` is the max |difference| of the final outputs over samples and outputs;
    `top1_agreement` the fraction of samples whose argmax over the last axis of the FIRST final output matches
    the float model (every position of its leading axes counts); when that last axis has size 1 (a regressor or
    a single logit) or the output is a scalar, argmax says nothing and `top1_agreement` is
    1 - min(1, max_abs_error) instead (the profile's `top1_by_error` says so).
    `progress(text)` is called once per tensor, after it is measured, with that tensor's results.

    Cached as JSON next to the profiles (monitor.profile.profile_path, the "fingerprint" being
    fidelity-n<samples>-s<seed>-<codecs>[-t<hash of the tensors named>]), keyed by model hash, input shapes and
    batch as well: a second call returns the stored result. `refresh` measures again and overwrites it;
    `cache=False` neither reads nor writes.
    """
    from splitinfer.monitor.flops import input_specs  # lazy: loads TensorFlow
    from splitinfer.splitter.graph import ModelGraph, model_hash  # lazy: loads TensorFlow

    graph = graph if isinstance(graph, ModelGraph) else ModelGraph(graph)
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    chosen_codecs = _codecs(codecs)
    specs = input_specs(graph, batch)  # refuses batch < 1 and unknown non-batch dimensions before any work
    input_shapes = [list(s.shape[1:]) for s in specs]
    candidates = _candidates(graph, tensors)
    if tensors is not None and not candidates:
        raise SplitError("no tensor to measure")
    mhash = model_hash(graph.model)
    path = profile_path(mhash, input_shapes, batch,
                        _cache_key(samples, seed, chosen_codecs, None if tensors is None else candidates), cache_dir)

    def measure() -> CompressionProfile:
        start = time.perf_counter()
        entries, about = compression_entries(
            graph, candidates, chosen_codecs, samples=samples, seed=seed, batch=batch, progress=progress)
        return CompressionProfile(
            model=graph.name, model_hash=mhash, input_shapes=input_shapes, batch=batch, samples=samples,
            seed=seed, codecs=chosen_codecs, **about,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            measure_seconds=round(time.perf_counter() - start, 3), entries=entries,
        )

    return CompressionProfile.cached(path, measure, read=cache and not refresh, write=cache)


__all__ = ["COMPRESSION_FORMAT", "CompressionEntry", "CompressionProfile", "MIN_FIDELITY", "compression_entries",
           "measure_compression"]


VARIANT_SAMPLES = 16


def variant_fidelity(reference: ModelGraph, variant: ModelGraph, samples: int = VARIANT_SAMPLES,
                     seed: int = 0) -> float:
    """How often a model variant answers like the reference, on `samples` random inputs: the top-1 agreement of
    their first output when it is a score vector, else 1 - its relative error (0 at or past 100%). Why: a
    variant's accuracy figure when its user gives none; the planner trades it against latency (min_accuracy).
    Raises SplitError when the two do not take and give the same tensors."""
    from splitinfer.splitter.build import build_part  # lazy: loads TensorFlow
    from splitinfer.splitter.keras_parts import CompiledPart
    from splitinfer.splitter.tensors import random_inputs

    problem = same_interface(reference, variant)
    if problem:
        raise SplitError(problem)

    def compiled(graph: ModelGraph) -> CompiledPart:
        spec = PartSpec("variant", graph.compute_nodes, list(graph.inputs), list(graph.outputs))
        return CompiledPart(build_part(graph, spec), spec.inputs, spec.outputs)

    ref_fn, var_fn = compiled(reference), compiled(variant)
    specs = [TensorSpec(**reference.tensors[t].to_json()) for t in reference.inputs]
    first = reference.outputs[0]
    shape = reference.tensors[first].shape
    by_error = len(shape) == 0 or shape[-1] == 1
    scores = []
    for s in range(samples):
        inputs = random_inputs(specs, 1, seed + s)
        got, ref = var_fn(inputs)[first], ref_fn(inputs)[first]
        scores.append(max(0.0, 1.0 - _rel_err(got, ref)) if by_error else _top1(got, ref))
    return float(np.mean(scores))


def same_interface(reference: ModelGraph, variant: ModelGraph) -> str | None:
    """None when `variant` takes and gives the reference's tensors (names, dtypes, shapes but the batch), else
    a one-line reason. Jobs name their inputs and wait for outputs by name, whichever variant answers them."""
    for what, a, b in (("inputs", reference.inputs, variant.inputs), ("outputs", reference.outputs, variant.outputs)):
        if list(a) != list(b):
            return f"the variant's {what} {list(b)} are not the reference's {list(a)}"
        for t in a:
            x, y = reference.tensors[t], variant.tensors[t]
            if x.dtype != y.dtype or tuple(x.shape[1:]) != tuple(y.shape[1:]):
                return (f"the variant's {t} is {y.dtype}{list(y.shape)}, the reference's "
                        f"{x.dtype}{list(x.shape)}")
    return None
