"""Cut a Keras model into parts that compose back exactly. Pure: imports no broker code.

The names below load on first use (PEP 562): the graph and the parts import TensorFlow, and what only reads a
manifest, hashes a part file or parses a shape (`splitinfer.splitter.manifest`: the model pool, the servers'
checks, the client) should not pay for it.
"""

from splitinfer._lazy import lazy_exports

_LAZY = {
    "CompiledPart": "keras_parts", "build_part": "build", "load_part_model": "keras_parts", "load_source_model": "build", "load_graph": "build",
    "random_inputs": "tensors", "run_parts": "verify", "save_split": "build", "save_split_on_runtimes": "build",
    "verify_split": "build",
    "SplitError": "errors",
    "GraphNode": "graph", "ModelGraph": "graph", "model_hash": "graph",
    "Manifest": "manifest", "PartEntry": "manifest", "PartOutput": "manifest", "TensorSpec": "manifest",
    "parse_shape": "manifest", "TensorInfo": "tensors",
    "PartSpec": "partition", "balanced_cuts": "partition", "balanced_split": "partition", "split_at_cuts": "partition", "split_by_groups": "partition",
}


__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "CompiledPart", "GraphNode", "Manifest", "ModelGraph", "PartEntry", "PartOutput", "PartSpec",
    "SplitError", "TensorInfo", "TensorSpec", "balanced_cuts", "balanced_split", "build_part", "load_part_model",
    "load_graph", "load_source_model", "model_hash", "parse_shape", "random_inputs", "run_parts", "save_split", "save_split_on_runtimes",
    "split_at_cuts", "split_by_groups", "verify_split",
]
