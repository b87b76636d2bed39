"""Checking a split against its source model, whatever their framework and runtime: the parts composed as the
manifest says, every tensor they hand over against the source's own, on random inputs. Pure numpy: the caller
brings the runnables (a Keras replay, an ONNX Runtime session, ...)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.manifest import Manifest
from splitinfer.splitter.tensors import random_inputs, tensor_error

Runnable = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def run_parts(parts: Sequence[Runnable], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run parts in manifest (topological) order, each on the tensors produced so far."""
    tensors = dict(inputs)
    for part in parts:
        tensors.update(part(tensors))
    return tensors


def handed_over(manifest: Manifest) -> list[str]:
    """Every tensor some part gives, in manifest order."""
    return list(dict.fromkeys(o.name for p in manifest.parts for o in p.outputs))


def compare_split(manifest: Manifest, parts_by_runtime: Mapping[str, Sequence[Runnable]], reference: Runnable,
                  whole: Runnable, samples: int, seed: int, batch: int, error_line: Callable[[BaseException], str]
                  ) -> dict:
    """Every tensor handed over (`reference`: the source computing all of them) and the final outputs (`whole`:
    the source called as a whole) against what the parts give, for each runtime's set of parts.

    Every handed-over tensor is compared, not only the final outputs: a model with random weights often gives the
    same near-uniform softmax for every input, which would make a final-only check vacuous."""
    tensors = handed_over(manifest)
    missing = [t for t in manifest.output_names if t not in tensors]
    if missing:
        raise SplitError(f"no part produces the final output {missing[0]!r}")
    finals = set(manifest.output_names)
    errors = {t: 0.0 for t in tensors}
    per_runtime = {runtime: 0.0 for runtime in parts_by_runtime}
    spread = {t: 0.0 for t in manifest.output_names}
    previous: dict[str, np.ndarray] = {}
    for s in range(samples):
        inputs = random_inputs(manifest.inputs, batch, seed + s)
        try:
            want = reference(inputs)
            whole_outputs = whole(inputs)
            got_by_runtime = {runtime: run_parts(parts, inputs) for runtime, parts in parts_by_runtime.items()}
        except SplitError:
            raise
        except Exception as exc:  # noqa: BLE001 - a model that cannot run on these inputs; say why in one line
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
            free = any(d is None for t in manifest.inputs for d in t.shape[1:])
            hint = " (its inputs have free dimensions, filled with 1: split it with --input-shape)" if free else ""
            raise SplitError(f"cannot run the split on random inputs {shapes}{hint}: {error_line(exc)}") from None
        for runtime, got in got_by_runtime.items():
            # the final outputs also against the source model's own call, not only against its replay
            for refs in (whole_outputs, want):
                for name, ref in refs.items():
                    if name not in got:
                        raise SplitError(f"no part produces {name!r}")
                    if got[name].shape != ref.shape:
                        raise SplitError(f"{name!r} has shape {got[name].shape} on {runtime}, the full model gives "
                                         f"{ref.shape}")
                    err = tensor_error(got[name], ref)
                    errors[name] = max(errors[name], err)
                    per_runtime[runtime] = max(per_runtime[runtime], err)
        for name, ref in want.items():
            if name in finals and name in previous:
                diff = previous[name].astype(np.float64) - ref.astype(np.float64)
                spread[name] = max(spread[name], float(np.max(np.abs(diff), initial=0.0)))
            previous[name] = ref
    return {
        "split_id": manifest.split_id,
        "model": manifest.source.name,
        "parts": len(manifest.parts),
        "samples": samples,
        "tensors_compared": len(tensors),
        "max_abs_error": max(errors.values(), default=0.0),
        "per_output": {t: errors[t] for t in manifest.output_names},
        "per_runtime": per_runtime,
        "max_handover_error": max((e for t, e in errors.items() if t not in finals), default=0.0),
        "output_spread": spread,
    }


def runtime_sets(manifest: Manifest) -> list[str]:
    """The runtimes to verify a split on: each one some part can run on (a part without that runtime's file
    runs on its own runtime in that set)."""
    return list(dict.fromkeys(r for p in manifest.parts for r in [p.runtime_name, *p.runtimes]))
