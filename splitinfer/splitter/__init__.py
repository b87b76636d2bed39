"""Cut a Keras model into parts that compose back exactly. Pure: imports no broker code."""

from splitinfer.splitter.build import (
    CompiledPart,
    build_part,
    load_part_model,
    load_source_model,
    parse_shape,
    random_inputs,
    run_parts,
    save_split,
    verify_split,
)
from splitinfer.splitter.graph import GraphNode, ModelGraph, SplitError, TensorInfo, model_hash
from splitinfer.splitter.manifest import Manifest, PartEntry, PartOutput, TensorSpec
from splitinfer.splitter.partition import PartSpec, balanced_cuts, split_at_cuts, split_by_groups

__all__ = [
    "CompiledPart", "GraphNode", "Manifest", "ModelGraph", "PartEntry", "PartOutput", "PartSpec",
    "SplitError", "TensorInfo", "TensorSpec", "balanced_cuts", "build_part", "load_part_model",
    "load_source_model", "model_hash", "parse_shape", "random_inputs", "run_parts", "save_split",
    "split_at_cuts", "split_by_groups", "verify_split",
]
