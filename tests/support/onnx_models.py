"""Small ONNX models built with onnx.helper (random weights, a free batch dimension), for the ONNX splitter's
tests: a residual CNN, a model with two inputs and two outputs, a branch that forks and joins."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _weights(rng, specs: dict[str, tuple]) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array((rng.normal(size=shape) * 0.2).astype(np.float32), name)
            for name, shape in specs.items()]


def _model(nodes, name, inputs, outputs, weights) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model


def residual_cnn(seed: int = 0, channels: int = 8, size: int = 12) -> onnx.ModelProto:
    """conv-bn-relu, two residual blocks (conv-relu-conv + skip), max pool, global pool, a dense head, softmax;
    a Constant node folded into the weights."""
    rng = np.random.default_rng(seed)
    c = channels
    w = {"w0": (c, 3, 3, 3), "b0": (c,), "bn_s": (c,), "bn_b": (c,), "bn_m": (c,), "bn_v": (c,)}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("BatchNormalization", ["c0", "bn_s", "bn_b", "bn_m", "bn_v"], ["n0"]),
             helper.make_node("Relu", ["n0"], ["r0"])]
    last = "r0"
    for k in range(2):
        w |= {f"w{k}a": (c, c, 3, 3), f"b{k}a": (c,), f"w{k}b": (c, c, 3, 3), f"b{k}b": (c,)}
        nodes += [helper.make_node("Conv", [last, f"w{k}a", f"b{k}a"], [f"blk{k}_a"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"blk{k}_a"], [f"blk{k}_ra"]),
                  helper.make_node("Conv", [f"blk{k}_ra", f"w{k}b", f"b{k}b"], [f"blk{k}_b"], pads=[1, 1, 1, 1]),
                  helper.make_node("Add", [f"blk{k}_b", last], [f"blk{k}_sum"]),
                  helper.make_node("Relu", [f"blk{k}_sum"], [f"blk{k}_out"])]
        last = f"blk{k}_out"
    w |= {"wd": (10, c), "bd": (10,)}
    nodes += [helper.make_node("MaxPool", [last], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("GlobalAveragePool", ["pool"], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(np.float32(0.5))),
              helper.make_node("Mul", ["flat", "scale"], ["scaled"]),
              helper.make_node("Gemm", ["scaled", "wd", "bd"], ["logits"], transB=1),
              helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    return _model(nodes, "residual_cnn",
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                  [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
                  _weights(rng, w))


def two_in_two_out(seed: int = 1) -> onnx.ModelProto:
    """An image and a feature vector in; a class score and an embedding out (the embedding from an early part
    of the graph, so a middle part gives a final output)."""
    rng = np.random.default_rng(seed)
    w = {"wc": (4, 2, 3, 3), "bc": (4,), "wf": (6, 8), "bf": (8,), "wj": (4 + 8, 5), "bj": (5,), "we": (8, 3)}
    nodes = [helper.make_node("Conv", ["img", "wc", "bc"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["conv"], ["act"]),
             helper.make_node("ReduceMean", ["act"], ["pooled"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["feat", "wf"], ["fmm"]),
             helper.make_node("Add", ["fmm", "bf"], ["fsum"]),
             helper.make_node("Tanh", ["fsum"], ["ftanh"]),
             helper.make_node("MatMul", ["ftanh", "we"], ["embedding"]),
             helper.make_node("Concat", ["pooled", "ftanh"], ["joined"], axis=1),
             helper.make_node("MatMul", ["joined", "wj"], ["jmm"]),
             helper.make_node("Add", ["jmm", "bj"], ["score"])]
    return _model(nodes, "two_in_two_out",
                  [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 2, 8, 8]),
                   helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 6])],
                  [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 5]),
                   helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3])],
                  _weights(rng, w))


def fork_join(seed: int = 2) -> onnx.ModelProto:
    """A stem, two branches of different depth (a gate: sigmoid times the other branch), joined, then a head."""
    rng = np.random.default_rng(seed)
    w = {"ws": (6, 3, 3, 3), "wl1": (6, 6, 3, 3), "wl2": (6, 6, 1, 1), "wr": (6, 6, 1, 1), "wh": (6, 4)}
    nodes = [helper.make_node("Conv", ["x", "ws"], ["stem"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["stem"], ["stem_r"]),
             helper.make_node("Conv", ["stem_r", "wl1"], ["left1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["left1"], ["left1_r"]),
             helper.make_node("Conv", ["left1_r", "wl2"], ["left2"]),
             helper.make_node("Conv", ["stem_r", "wr"], ["right"]),
             helper.make_node("Sigmoid", ["right"], ["gate"]),
             helper.make_node("Mul", ["left2", "gate"], ["gated"]),
             helper.make_node("GlobalAveragePool", ["gated"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("MatMul", ["flat", "wh"], ["out"])]
    return _model(nodes, "fork_join",
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
                  _weights(rng, w))
