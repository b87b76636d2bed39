"""The profile of a model at a fixed input shape: per-operation FLOPs, parameters, bytes and latency, per cut point
the bytes that cross it and the work before and after it, and whole-model totals.

How latency is measured and attributed
--------------------------------------
Timing each operation on its own would mostly time Python and per-call dispatch: a compiled call costs a
fixed ~0.2-0.5 ms here, more than most single layers take. So the model is cut at a subset of its valid cut
points into `segments` (default 12) consecutive pieces of similar estimated cost; each piece is built with
the splitter (`split_at_cuts` + `build_part`) and traced as ONE `tf.function`, exactly as a server would run
it. All pieces, the whole model (also one compiled function) and an empty compiled function are called in
interleaved rounds after a warm-up, and each gets the median over rounds. The empty function's time is the
fixed cost of a call (`call_overhead_ms`); a segment's compute time is its median minus that. When TF runs
single-threaded (settings.intra_op_threads = inter_op_threads = 1, as servers do) the clock is the process's
CPU time per call: the latency on an idle core, which other processes preempting this one on a shared machine
do not inflate (wall-clock medians of long calls grow more under load than those of short ones, so segments
and whole would disagree). The whole model's wall-clock median is kept as `latency_wall_ms`; with more threads
everything is wall clock (`clock` says which).

Inside a segment the compute time is shared among its operations in proportion to a cost estimate
    w = a * FLOPs + b * bytes moved (inputs + outputs + weights) + c
whose coefficients (a, b, c >= 0) are fitted by non-negative least squares to the measured segments of this
very model on this machine. Pure FLOPs shares would give zero time to the many operations the TF profiler
counts no FLOPs for (ReLU, padding, pooling) and too little to memory-bound ones (depthwise convolutions,
batch norm, squeeze-excite), while the fit lets the measurements say how much a FLOP and a byte cost here.
If the fit is degenerate the shares fall back to FLOPs (then equal shares). Each operation's latency is
stored split into its compute, memory and fixed parts, which is what `predict_latency` scales to another
machine. Per-operation latencies add up exactly to the measured segment compute times, so any part made of
whole segments is predicted from measurements, and a cut inside a segment only relies on the split within it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, Field

from splitinfer.monitor.cache import cache_root
from splitinfer.monitor.document import ModelDocument
from splitinfer.monitor.machine import MachineInfo, machine_info
from splitinfer.monitor.timing import Call, default_clock, interleaved_both, interleaved_ms, iqr, median, trivial_call
from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.partition import split_at_cuts

PROFILE_FORMAT = "splitinfer.profile"
PROFILE_VERSION = 2  # 2: segments timed on every runtime too

Progress = Callable[[str, int, int], None]  # (what is happening, steps done, steps in all)

CONV_TYPES = {
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "SeparableConv1D", "SeparableConv2D", "DepthwiseConv1D", "DepthwiseConv2D",
}
DENSE_TYPES = {"Dense", "EinsumDense", "MultiHeadAttention", "Matmul", "Einsum", "Dot", "Tensordot", "LSTM", "GRU", "SimpleRNN"}


def kind_of(op_type: str) -> Literal["conv", "dense", "other"]:
    if op_type in CONV_TYPES:
        return "conv"
    if op_type in DENSE_TYPES:
        return "dense"
    return "other"


class OpProfile(BaseModel):
    name: str = Field(description="graph node name (nested models flattened: `backbone/conv`, repeat calls `conv@1`)")
    op_type: str
    kind: Literal["conv", "dense", "other"] = Field(description="which calibration rate scales its compute")
    index: int = Field(description="position in the graph's topological order")
    is_input: bool = False
    inputs: list[str] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)
    flops: int = 0
    params: int = Field(0, description="weights of the operation (also for a repeat call of a shared layer)")
    param_bytes: int = 0
    shares_weights_with: str | None = Field(None, description="earlier call of the same layer, if this is a repeat")
    input_bytes: int = 0
    output_bytes: int = 0
    segment: int | None = Field(None, description="the measured segment it ran in")
    latency_ms: float = Field(0.0, description="attributed share of its segment's compute time")
    compute_ms: float = Field(0.0, description="the part of latency_ms the fit puts on FLOPs")
    memory_ms: float = Field(0.0, description="the part of latency_ms the fit puts on bytes moved")
    fixed_ms: float = Field(0.0, description="the per-operation constant part of latency_ms")

    @property
    def bytes_moved(self) -> int:
        return self.input_bytes + self.output_bytes + self.param_bytes


class CutProfile(BaseModel):
    tensor: str
    after: str = Field(description="the operation producing the tensor")
    position: int = Field(description="index of that operation in the topological order")
    shape: list[int | None]
    dtype: str
    bytes: int = Field(description="bytes crossing the cut at this profile's batch")
    ops_before: int
    flops_before: int
    flops_after: int
    latency_before_ms: float = Field(description="sum of per-op latencies before (no call overheads)")
    latency_after_ms: float


class SegmentProfile(BaseModel):
    index: int
    first: str
    last: str
    ops: int
    ends_at: str | None = Field(description="cut tensor ending the segment, None for the last")
    flops: int
    bytes_moved: int
    measured_ms: float = Field(description="median time of the compiled segment, call overhead included")
    iqr_ms: float
    compute_ms: float = Field(description="measured_ms minus call_overhead_ms (>= 0)")
    runtime_ms: dict[str, float] = Field(
        default_factory=dict, description="median time of the segment on each other runtime it could be exported "
                                          "to (onnxruntime, litert), call included, measured in the same rounds")


class CostFit(BaseModel):
    """Per-machine cost of one operation: ms = ms_per_gflop * GFLOPs + ms_per_mb * MB moved + ms_per_op."""

    method: Literal["nnls", "flops-share"]
    ms_per_gflop: float
    ms_per_mb: float
    ms_per_op: float
    r2: float | None = None


class Totals(BaseModel):
    flops: int = Field(description="sum of per-operation FLOPs")
    profiler_flops: int = Field(description="TF profiler total on the model's own concrete function")
    params: int = Field(description="distinct weights (a shared layer counted once)")
    param_bytes: int
    latency_ms: float = Field(description="measured whole model, one compiled function, median (profile's clock)")
    latency_iqr_ms: float
    latency_wall_ms: float = Field(description="the same calls by wall clock, median (includes other load)")
    sum_op_latency_ms: float = Field(description="sum of attributed per-operation latencies")
    sum_segment_latency_ms: float = Field(description="sum of the segments' medians, one call overhead each")
    segments_as_one_call_ms: float = Field(
        description="sum of the segments' compute (median less call overhead) plus one call overhead: the sum of "
        "per-segment latencies comparable with latency_ms")
    call_overhead_ms: float = Field(description="median time of an empty compiled call")
    segments: int


class ModelProfile(ModelDocument):
    FORMAT: ClassVar[str] = PROFILE_FORMAT
    VERSION: ClassVar[int] = PROFILE_VERSION
    format: str = PROFILE_FORMAT
    version: int = PROFILE_VERSION
    machine: MachineInfo
    created: str
    clock: Literal["wall", "cpu"] = Field(
        description="what the latencies are: wall-clock time, or this process's CPU time per call (used when TF "
        "runs single-threaded: the latency on an idle core, unaffected by other processes' load)")
    rounds: int
    warmup: int
    profile_seconds: float
    ops: list[OpProfile]
    cut_points: list[CutProfile]
    segments: list[SegmentProfile]
    fit: CostFit
    totals: Totals

    # -- queries ------------------------------------------------------------------------------

    def op(self, name: str) -> OpProfile:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)

    def ops_named(self, names: Iterable[str]) -> list[OpProfile]:
        wanted = set(names)
        return [o for o in self.ops if o.name in wanted]

    def cut(self, tensor: str) -> CutProfile:
        for c in self.cut_points:
            if c.tensor == tensor:
                return c
        raise KeyError(tensor)

    def runtime_op_seconds(self) -> dict[str, dict[str, float]]:
        """Every operation's seconds on each runtime measured ("tf": op_seconds), scaled from tf by its segment's
        ratio of times: runtime -> operation -> seconds. A runtime has no entry for the operations of a segment it
        could not run."""
        tf_seconds = self.op_seconds()
        out: dict[str, dict[str, float]] = {"tf": tf_seconds}
        segment_of = {o.name: o.segment for o in self.ops if not o.is_input}
        for seg in self.segments:
            for runtime, ms in seg.runtime_ms.items():
                factor = ms / seg.measured_ms if seg.measured_ms > 0 else 1.0
                costs = out.setdefault(runtime, {})
                costs.update({n: tf_seconds[n] * factor for n, i in segment_of.items() if i == seg.index})
        return out

    def op_seconds(self) -> dict[str, float]:
        """Attributed latency of every compute operation in seconds on the profiled machine: node costs for the
        planner's `cost_graph_from(graph, profile.op_seconds(), unit="seconds")`."""
        return {o.name: o.latency_ms / 1e3 for o in self.ops if not o.is_input}

    def op_flops(self) -> dict[str, int]:
        return {o.name: o.flops for o in self.ops if not o.is_input}

    def part_latency_ms(self, names: Iterable[str], include_overhead: bool = True) -> float:
        """Latency of a part made of these operations on the profiled machine, as one compiled call."""
        ops = self.ops_named(names)
        return sum(o.latency_ms for o in ops) + (self.totals.call_overhead_ms if include_overhead else 0.0)


def profile_path(model_hash: str, input_shapes: list[list[int]], batch: int, fingerprint: str,
                 cache_dir: Path | None = None) -> Path:
    """profiles/<model hash>-<shape>-b<batch>-<machine>-v<version>.json under the cache directory."""
    shape = "_".join("x".join(str(d) for d in s) for s in input_shapes) or "scalar"
    if len(shape) > 60:
        shape = hashlib.sha256(shape.encode()).hexdigest()[:16]
    name = f"{model_hash[:24]}-{shape}-b{batch}-{fingerprint}-v{PROFILE_VERSION}.json"
    return cache_root(cache_dir) / "profiles" / name


# -- building the profile -------------------------------------------------------------------------


def _segment_boundaries(graph, flops: dict[str, int], node_bytes: dict[str, int], segments: int) -> list[str]:
    """At most segments-1 cut points splitting the model into pieces of similar estimated cost.

    The estimate (FLOPs + 8 * bytes moved + 1e5 per op) is only for grouping; the times are measured.
    """
    points = graph.cut_points()
    if segments <= 1 or not points:
        return []
    est = {n: flops.get(n, 0) + 8 * node_bytes.get(n, 0) + 1e5 for n in graph.compute_nodes}
    total = sum(est.values())
    cum = []
    for t in points:
        mask = graph.upstream(t)
        cum.append(sum(est.get(n, 0.0) for n in graph.names_in(mask)))
    chosen: list[int] = []
    for k in range(1, segments):
        target = k * total / segments
        j = min(range(len(points)), key=lambda i: abs(cum[i] - target))
        if j not in chosen:
            chosen.append(j)
    return [points[j] for j in sorted(chosen)]


def _compile(model, args):
    """One concrete function calling the part model, traced for the shapes and dtypes of `args`. A closure, never a
    default argument: a Keras model passed as a default argument becomes part of the call signature and costs
    milliseconds per call to flatten."""
    import tensorflow as tf  # lazy: loads TensorFlow

    def fn(*xs):
        return model(list(xs), training=False)

    return tf.function(fn, autograph=False).get_concrete_function(*[tf.TensorSpec(a.shape, a.dtype) for a in args])


def _compile_chain(graph, specs, values: dict, compiled: Callable[[int], None] | None = None) -> list[Call]:
    """Each part of `specs` (topological order) built with `build_part`, compiled, and run once on the outputs of
    the parts before it: (compiled function, its arguments) per part. `values` holds the model inputs and gets
    every part's outputs; `compiled(k)` is called after the k-th part."""
    from keras import tree  # lazy: loads TensorFlow

    from splitinfer.splitter.build import build_part  # lazy: loads TensorFlow

    calls = []
    for spec in specs:
        args = [values[t] for t in spec.inputs]
        fn = _compile(build_part(graph, spec), args)
        for t, v in zip(spec.outputs, tree.flatten(fn(*args))):
            values[t] = v
        calls.append((fn, args))
        if compiled:
            compiled(len(calls))
    return calls


def _other_runtimes() -> list[str]:
    from splitinfer.splitter.runtimes import available_runtimes

    return [r for r in available_runtimes() if r != "tf"]


def _runtime_calls(graph, specs, values: dict, runtime: str) -> dict[int, Call]:
    """Segment index -> a call running that segment on `runtime` (exported to its format, in a scratch
    directory), on the same inputs as its tf call. A segment that fails to export or to run is left out."""
    import tempfile

    from splitinfer.config import get_settings
    from splitinfer.splitter.build import EXPORTERS, build_part
    from splitinfer.splitter.manifest import RUNTIME_FORMATS
    from splitinfer.splitter.runtimes import LiteRtPart, OnnxPart

    fmt = RUNTIME_FORMATS[runtime]
    runner = OnnxPart if runtime == "onnxruntime" else LiteRtPart
    threads = get_settings().intra_op_threads
    calls: dict[int, Call] = {}
    with tempfile.TemporaryDirectory(prefix="splitinfer-profile-") as tmp:
        for i, spec in enumerate(specs):
            path = Path(tmp) / f"segment{i}.{fmt}"
            try:
                EXPORTERS[fmt](build_part(graph, spec), path)
                part = runner(path, spec.inputs, spec.outputs, threads, label=f"segment {i}")
                args = [np.asarray(values[t]) for t in spec.inputs]
                part(dict(zip(spec.inputs, args)))
            except Exception:  # noqa: BLE001 - this runtime cannot take this segment: the planner keeps it on others
                continue
            calls[i] = (lambda *xs, part=part, names=spec.inputs: part(dict(zip(names, xs))), args)
    return calls


def _random_values(graph, batch: int, seed: int) -> dict:
    """Random model inputs at `batch` as TF tensors (splitter.tensors.random_array, one generator seeded by `seed`)."""
    import tensorflow as tf  # lazy: loads TensorFlow

    from splitinfer.splitter.tensors import random_array

    rng = np.random.default_rng(seed)
    values = {}
    for t in graph.inputs:
        info = graph.tensors[t]
        shape = [batch if (i == 0 and d is None) else d for i, d in enumerate(info.shape)]
        values[t] = tf.constant(random_array(rng, shape, info.dtype))
    return values


def _fit(segs: list[dict]) -> CostFit:
    """NNLS fit of segment compute time on (GFLOPs, MB moved, op count)."""
    from scipy.optimize import nnls  # lazy: ~0.5 s to import, only when measuring

    rows = [[s["flops"] / 1e9, s["bytes"] / 1e6, float(s["ops"])] for s in segs]
    y = np.array([s["compute_ms"] for s in segs])
    if len(segs) >= 3 and y.sum() > 0:
        A = np.array(rows)
        scale = A.max(axis=0)
        scale[scale == 0] = 1.0
        coef, _ = nnls(A / scale, y)
        coef = coef / scale
        if np.any(coef[:2] > 0):
            pred = A @ coef
            ss = float(((y - y.mean()) ** 2).sum())
            r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else None
            return CostFit(method="nnls", ms_per_gflop=float(coef[0]), ms_per_mb=float(coef[1]),
                           ms_per_op=float(coef[2]), r2=r2)
    total_gflop = sum(r[0] for r in rows)
    return CostFit(method="flops-share", ms_per_gflop=float(y.sum() / total_gflop) if total_gflop else 0.0,
                   ms_per_mb=0.0, ms_per_op=0.0)


def build_profile(
    graph,
    *,
    batch: int = 1,
    segments: int = 12,
    rounds: int = 40,
    warmup: int = 3,
    progress: Progress | None = None,
    model_hash: str | None = None,
    seed: int = 0,
    clock: Literal["wall", "cpu"] | None = None,
    runtimes: Iterable[str] | None = None,
) -> ModelProfile:
    """Measure `graph` (a splitter ModelGraph) on this machine now. See the module docstring for the method.
    `clock` defaults to timing.default_clock(): CPU time when TF is single-threaded, else wall clock. `runtimes`:
    the runtimes besides tf to time the segments on (default: every one installed)."""
    import tensorflow as tf  # lazy: loads TensorFlow

    from splitinfer.monitor.flops import node_flops, whole_model_profiler_flops  # lazy: loads TensorFlow
    from splitinfer.splitter.graph import error_line, model_hash as _model_hash  # lazy: loads TensorFlow

    if batch < 1:
        raise SplitError(f"batch must be at least 1, not {batch}")
    if rounds < 3:
        raise SplitError("rounds must be at least 3")
    if not graph.compute_nodes:
        raise SplitError(f"{graph.name} has no operations to profile")
    started = time.perf_counter()
    report = progress or (lambda *_: None)
    total_steps = 2 + max(1, segments) + rounds  # corrected once the segments are known
    step = 0

    def tick(what: str) -> None:
        nonlocal step
        step += 1
        report(what, step, total_steps)

    report("counting FLOPs", 0, total_steps)
    flops = node_flops(graph, batch)
    profiler_total = whole_model_profiler_flops(graph, batch)
    tick("counting FLOPs")

    # static facts per node
    owner_of_weights: dict[int, str] = {}
    ops: list[OpProfile] = []
    node_bytes: dict[str, int] = {}
    distinct_params = distinct_param_bytes = 0
    for name in graph.order:
        node = graph.nodes[name]
        params, pbytes = (0, 0) if node.is_input else node.weight_size()
        shares = None
        if params:
            key = id(node.operation)
            if key in owner_of_weights:
                shares = owner_of_weights[key]
            else:
                owner_of_weights[key] = name
                distinct_params += params
                distinct_param_bytes += pbytes
        in_bytes = sum(graph.tensors[t].nbytes(batch) for t in node.unique_inputs)
        out_bytes = sum(graph.tensors[t].nbytes(batch) for t in node.outputs)
        op = OpProfile(
            name=name, op_type=node.op_type, kind=kind_of(node.op_type), index=graph.index[name],
            is_input=node.is_input, inputs=list(node.inputs), outputs=list(node.outputs),
            flops=int(flops.get(name, 0)), params=params, param_bytes=pbytes, shares_weights_with=shares,
            input_bytes=in_bytes, output_bytes=out_bytes,
        )
        ops.append(op)
        if not node.is_input:
            node_bytes[name] = op.bytes_moved
    by_name = {o.name: o for o in ops}

    # compiled pieces: the whole model and the segments
    boundaries = _segment_boundaries(graph, flops, node_bytes, segments)
    specs = split_at_cuts(graph, boundaries)
    total_steps = 2 + len(specs) + rounds
    whole_spec = split_at_cuts(graph, [])[0]
    values = _random_values(graph, batch, seed)
    try:
        # run once here, so that a shape the model cannot take fails now, not mid-measurement
        whole = _compile_chain(graph, [whole_spec], dict(values))
    except (ValueError, TypeError, tf.errors.OpError) as exc:
        raise SplitError(f"cannot run {graph.name} at input shape {[list(v.shape) for v in values.values()]}: "
                         f"{error_line(exc)}") from None
    tick("compiling the whole model")
    calls = [trivial_call(), *whole]
    calls += _compile_chain(graph, specs, values, lambda k: tick(f"compiling segment {k}/{len(specs)}"))
    # the same segments on the other runtimes (a segment a runtime cannot take is left out), timed in rounds of
    # their own after tf's: another runtime's threads would bill tf's calls for their time on the CPU clock
    other = {r: _runtime_calls(graph, specs, values, r) for r in (runtimes if runtimes is not None else
                                                                  _other_runtimes())}
    other_calls: list[Call] = []
    runtime_index: dict[str, dict[int, int]] = {}
    for r, seg_calls in other.items():
        for i, call in seg_calls.items():
            runtime_index.setdefault(r, {})[i] = len(other_calls)
            other_calls.append(call)
    report("warming up", step, total_steps)

    clock = clock or default_clock()
    wall, cpu = interleaved_both(calls, rounds, warmup, on_round=lambda r: tick(f"measuring round {r}/{rounds}"))
    times = cpu if clock == "cpu" else wall
    if other_calls:
        other_wall, other_cpu = interleaved_both(other_calls, rounds, warmup)
        other_times = other_cpu if clock == "cpu" else other_wall
    overhead = median(times[0])
    whole_ms, whole_iqr = median(times[1]), iqr(times[1])

    seg_rows = []
    for i, (spec, t) in enumerate(zip(specs, times[2:])):
        m = median(t)
        seg_rows.append({
            "spec": spec, "measured_ms": m, "iqr_ms": iqr(t), "compute_ms": max(0.0, m - overhead),
            "flops": sum(by_name[n].flops for n in spec.nodes),
            "bytes": sum(by_name[n].bytes_moved for n in spec.nodes),
            "ops": len(spec.nodes),
        })
    fit = _fit(seg_rows)

    segments_out = []
    for i, row in enumerate(seg_rows):
        spec = row["spec"]
        parts = []
        for n in spec.nodes:
            o = by_name[n]
            if fit.method == "nnls":
                parts.append((fit.ms_per_gflop * o.flops / 1e9, fit.ms_per_mb * o.bytes_moved / 1e6, fit.ms_per_op))
            else:
                parts.append((float(o.flops), 0.0, 0.0))
        weight = sum(sum(p) for p in parts)
        for n, (c, mem, fx) in zip(spec.nodes, parts):
            o = by_name[n]
            o.segment = i
            if weight > 0:
                scale = row["compute_ms"] / weight
                o.compute_ms, o.memory_ms, o.fixed_ms = c * scale, mem * scale, fx * scale
            else:
                o.compute_ms, o.memory_ms, o.fixed_ms = 0.0, 0.0, row["compute_ms"] / len(spec.nodes)
            o.latency_ms = o.compute_ms + o.memory_ms + o.fixed_ms
        segments_out.append(SegmentProfile(
            index=i, first=spec.nodes[0], last=spec.nodes[-1], ops=len(spec.nodes),
            ends_at=boundaries[i] if i < len(boundaries) else None, flops=row["flops"], bytes_moved=row["bytes"],
            measured_ms=row["measured_ms"], iqr_ms=row["iqr_ms"], compute_ms=row["compute_ms"],
            runtime_ms={r: median(other_times[idx[i]]) for r, idx in runtime_index.items() if i in idx},
        ))

    total_flops = sum(o.flops for o in ops)
    total_latency = sum(o.latency_ms for o in ops)
    cuts = []
    for t in graph.cut_points():
        info = graph.tensors[t]
        before = [by_name[n] for n in graph.names_in(graph.upstream(t))]
        fb = sum(o.flops for o in before)
        lb = sum(o.latency_ms for o in before)
        cuts.append(CutProfile(
            tensor=t, after=info.producer, position=graph.index[info.producer], shape=list(info.shape),
            dtype=info.dtype, bytes=info.nbytes(batch), ops_before=sum(1 for o in before if not o.is_input),
            flops_before=fb, flops_after=total_flops - fb, latency_before_ms=lb,
            latency_after_ms=max(0.0, total_latency - lb),
        ))

    input_shapes = [[int(d) for d in graph.tensors[t].shape[1:]] for t in graph.inputs]
    return ModelProfile(
        model=graph.name,
        model_hash=model_hash or _model_hash(graph.model),
        input_shapes=input_shapes,
        batch=batch,
        machine=machine_info(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        clock=clock,
        rounds=rounds,
        warmup=warmup,
        profile_seconds=round(time.perf_counter() - started, 2),
        ops=ops,
        cut_points=cuts,
        segments=segments_out,
        fit=fit,
        totals=Totals(
            flops=total_flops, profiler_flops=profiler_total, params=distinct_params,
            param_bytes=distinct_param_bytes, latency_ms=whole_ms, latency_iqr_ms=whole_iqr,
            latency_wall_ms=median(wall[1]),
            sum_op_latency_ms=total_latency, sum_segment_latency_ms=sum(r["measured_ms"] for r in seg_rows),
            segments_as_one_call_ms=sum(r["compute_ms"] for r in seg_rows) + overhead,
            call_overhead_ms=overhead, segments=len(seg_rows),
        ),
    )


def profile_model(
    model,
    *,
    batch: int = 1,
    segments: int = 12,
    rounds: int = 40,
    warmup: int = 3,
    cache: bool = True,
    refresh: bool = False,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> ModelProfile:
    """The profile of a keras.Model (or splitter ModelGraph) at its fixed input shape and `batch` on this machine.

    Cached as JSON under `cache_dir` (default settings.cache_dir/profiles), keyed by model hash, input shape,
    batch and machine fingerprint: a second call returns the stored profile without measuring. `refresh`
    measures again and overwrites it; `cache=False` neither reads nor writes.
    """
    from splitinfer.monitor.flops import input_specs  # lazy: loads TensorFlow
    from splitinfer.splitter.graph import ModelGraph, model_hash  # lazy: loads TensorFlow

    graph = model if isinstance(model, ModelGraph) else ModelGraph(model)
    specs = input_specs(graph, batch)  # refuses unknown non-batch dimensions before any work
    mhash = model_hash(graph.model)
    # the runtimes installed are part of what was measured: a profile taken with LiteRT present names it
    fingerprint = f"{machine_info().fingerprint}-{'+'.join(_other_runtimes()) or 'tf'}"
    path = profile_path(mhash, [list(s.shape[1:]) for s in specs], batch, fingerprint, cache_dir)
    return ModelProfile.cached(
        path,
        lambda: build_profile(graph, batch=batch, segments=segments, rounds=rounds, warmup=warmup,
                              progress=progress, model_hash=mhash),
        read=cache and not refresh,
        write=cache,
    )


def measure_parts(graph, specs, *, batch: int = 1, rounds: int = 30, warmup: int = 3, seed: int = 0,
                  clock: Literal["wall", "cpu"] | None = None) -> list[float]:
    """Median milliseconds of each part (splitter PartSpecs, topological order), each built with `build_part`
    and run as one compiled function on the outputs of the parts before it, in interleaved rounds.

    This is what a server pays per call for the part; the planner's predictions are checked against it.
    `clock` as for build_profile (default: CPU time when TF is single-threaded, else wall clock)."""
    calls = _compile_chain(graph, specs, _random_values(graph, batch, seed))
    return [median(t) for t in interleaved_ms(calls, rounds, warmup, clock=clock or default_clock())]
