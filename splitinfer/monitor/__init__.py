"""Profiling (per-operation FLOPs, params, output bytes, latency; machine calibration) and the cost model's
latency prediction; runtime monitors' pure parts (`links`: link emulation, `runtime`: load, speed, battery).
Pure: imports no broker code.

The names below load on first use (PEP 562): the profiling modules import TensorFlow, and an actor that only
needs `splitinfer.monitor.links` (the front end) should not pay for it.
"""

from splitinfer._lazy import lazy_exports

_LAZY = {
    "Calibration": "calibration", "calibrate": "calibration", "load_or_calibrate": "calibration",
    "predict_latency": "calibration", "predict_part_latency": "calibration", "speed_factor": "calibration",
    "node_flops": "flops", "whole_model_profiler_flops": "flops",
    "CompressionProfile": "fidelity", "measure_compression": "fidelity",
    "MachineInfo": "machine", "apply_threads": "machine", "machine_info": "machine",
    "CostFit": "profile", "CutProfile": "profile", "ModelProfile": "profile", "OpProfile": "profile",
    "SegmentProfile": "profile", "Totals": "profile", "build_profile": "profile", "measure_parts": "profile",
    "profile_model": "profile",
}


__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "Calibration", "CompressionProfile", "CostFit", "CutProfile", "MachineInfo", "ModelProfile", "OpProfile",
    "SegmentProfile",
    "Totals", "apply_threads", "build_profile", "calibrate", "load_or_calibrate", "machine_info", "measure_parts",
    "measure_compression", "node_flops",
    "predict_latency", "predict_part_latency", "profile_model", "speed_factor", "whole_model_profiler_flops",
]
