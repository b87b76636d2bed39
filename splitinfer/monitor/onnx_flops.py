"""FLOPs per node of an ONNX graph, counted analytically from the shapes (a multiply-add is 2 FLOPs, as
TensorFlow's profiler counts them for Keras models, so the planner compares both alike). Pure: the graph's shapes
only, no runtime. Unknown dimensions count as 1 (the batch: FLOPs are per sample).

Counted: convolutions (and transposed), Gemm/MatMul, elementwise and activation ops (one FLOP per output
element, a few for the transcendental ones), pooling (window size per output), reductions (one per input
element), normalisation and Softmax (a few per element). Data movement (Reshape, Transpose, Concat, Pad,
Gather, Cast, ...) is free.
"""

from __future__ import annotations

import math

from onnx import helper

from splitinfer.splitter.onnx_graph import OnnxGraph, OnnxNode

ELEMENTWISE = {
    "Add": 1, "Sub": 1, "Mul": 1, "Div": 1, "Neg": 1, "Abs": 1, "Max": 1, "Min": 1, "Sum": 1, "Mean": 1,
    "Relu": 1, "LeakyRelu": 2, "PRelu": 2, "Clip": 1, "HardSigmoid": 3, "HardSwish": 4, "Sign": 1,
    "Sigmoid": 4, "Tanh": 4, "Exp": 4, "Log": 4, "Sqrt": 2, "Reciprocal": 1, "Pow": 4, "Erf": 4, "Gelu": 8,
    "Elu": 4, "Selu": 4, "Softplus": 4, "Mish": 8, "Where": 1, "Equal": 1, "Less": 1, "Greater": 1,
    "Floor": 1, "Ceil": 1, "Round": 1, "Not": 1, "And": 1, "Or": 1, "Xor": 1, "Dropout": 0,
}
PER_ELEMENT = {"BatchNormalization": 2, "InstanceNormalization": 5, "LayerNormalization": 5,
               "GroupNormalization": 5, "LpNormalization": 3, "Softmax": 3, "LogSoftmax": 4,
               "DequantizeLinear": 2, "QuantizeLinear": 2}
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
              "ReduceSumSquare", "GlobalAveragePool", "GlobalMaxPool", "ArgMax", "ArgMin"}
POOLS = {"MaxPool", "AveragePool", "LpPool"}


def _elements(shape) -> int:
    return math.prod(d or 1 for d in shape) if shape else 1


def node_flops_onnx(graph: OnnxGraph) -> dict[str, int]:
    """FLOPs of every compute node for one sample."""
    return {n: _flops(graph, graph.nodes[n]) for n in graph.compute_nodes}


def _shape(graph: OnnxGraph, name: str) -> tuple:
    if name in graph.weights:
        return tuple(graph.weights[name].dims)
    info = graph.tensors.get(name)
    return tuple(info.shape) if info is not None else ()


def _attrs(node: OnnxNode) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.proto.attribute}


def _flops(graph: OnnxGraph, node: OnnxNode) -> int:
    op = node.op_type
    ins = [t for t in node.proto.input]
    out = _elements(_shape(graph, node.outputs[0])) if node.outputs else 0
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = _shape(graph, ins[3] if op == "QLinearConv" else ins[1])
        bias = out if len(ins) > 2 and ins[2] and op == "Conv" else 0
        return 2 * out * math.prod(w[1:]) + bias if w else 0
    if op == "ConvTranspose":
        w = _shape(graph, ins[1])
        return 2 * _elements(_shape(graph, ins[0])) * math.prod(w[1:]) if w else 0
    if op == "Gemm":
        a = _shape(graph, ins[0])
        k = (a[0] if _attrs(node).get("transA", 0) else a[-1]) if a else 1
        return 2 * out * (k or 1) + (out if len(ins) > 2 and ins[2] else 0)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = _shape(graph, ins[0])
        return 2 * out * ((a[-1] or 1) if a else 1)
    if op == "Einsum":
        return 2 * max(out, max((_elements(_shape(graph, t)) for t in ins), default=0))
    if op in ELEMENTWISE:
        return ELEMENTWISE[op] * out
    if op in PER_ELEMENT:
        return PER_ELEMENT[op] * out
    if op in REDUCTIONS:
        return _elements(_shape(graph, ins[0]))
    if op in POOLS:
        return out * math.prod(_attrs(node).get("kernel_shape", [1]))
    if op in ("Resize", "Upsample"):
        return 4 * out
    return 0
