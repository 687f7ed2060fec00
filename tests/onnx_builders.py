"""Third-party ONNX models built with onnx.helper (not tierwise's zoo), for the tests of
bringing your own model: a small residual network with a fixed batch of 1, as many exporters
write them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# the tensors inside the two residual blocks: never cut points (the skip crosses beside them)
RESIDUAL_INTERIORS = ("b0_c1", "b0_r1", "b0_c2", "b1_c1", "b1_r1", "b1_c2")
BLOCK_BOUNDARIES = ("stem_relu", "b0_out", "b1_out")


def residual_net(batch: int | str = 1, size: int = 16, classes: int = 5, opset: int = 17,
                 input_name: str = "pixels", seed: int = 0) -> onnx.ModelProto:
    """pixels FP32 [batch, 3, size, size] -> logits FP32 [batch, classes]: a conv stem, two
    residual blocks (conv-relu-conv + skip, relu), global pooling and a linear layer."""
    rng = np.random.default_rng(seed)
    weights: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, shape: list[int]) -> str:
        fan_in = int(np.prod(shape[1:]))
        weights.append(numpy_helper.from_array(
            rng.normal(0, 1 / np.sqrt(fan_in), shape).astype(np.float32), name))
        return name

    nodes.append(helper.make_node("Conv", [input_name, weight("w_stem", [8, 3, 3, 3])],
                                  ["stem"], pads=[1, 1, 1, 1], strides=[2, 2]))
    nodes.append(helper.make_node("Relu", ["stem"], ["stem_relu"]))
    previous = "stem_relu"
    for block in range(2):
        name = f"b{block}"
        nodes += [
            helper.make_node("Conv", [previous, weight(f"w_{name}a", [8, 8, 3, 3])],
                             [f"{name}_c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"{name}_c1"], [f"{name}_r1"]),
            helper.make_node("Conv", [f"{name}_r1", weight(f"w_{name}b", [8, 8, 3, 3])],
                             [f"{name}_c2"], pads=[1, 1, 1, 1]),
            helper.make_node("Add", [f"{name}_c2", previous], [f"{name}_add"]),
            helper.make_node("Relu", [f"{name}_add"], [f"{name}_out"]),
        ]
        previous = f"{name}_out"
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", weight("w_fc", [classes, 8])], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "residual-net",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def pinned_batch_net() -> onnx.ModelProto:
    """A model whose Reshape hard-codes a batch of 1: it cannot be served batched."""
    shape = numpy_helper.from_array(np.array([1, 12], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]),
         helper.make_node("Relu", ["flat"], ["y"])],
        "pinned", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12])], [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def fixed_box_detector(box: tuple[float, float, float, float], score: float = 0.9,
                       size: int = 16) -> onnx.ModelProto:
    """A detector for tests: pixels FP32 [N, 3, size, size] -> boxes FP32 [N, 1, 4] (always
    `box`, normalised x_min, y_min, x_max, y_max) and scores FP32 [N, 1] (always `score`);
    the input only sets the batch."""
    constants = [numpy_helper.from_array(np.array(box, np.float32).reshape(1, 1, 4), "box"),
                 numpy_helper.from_array(np.array([[score]], np.float32), "score"),
                 numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                 numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape3"),
                 numpy_helper.from_array(np.array([-1, 1], np.int64), "shape2")]
    nodes = [helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
             helper.make_node("Reshape", ["nothing", "shape3"], ["nothing3"]),
             helper.make_node("Reshape", ["nothing", "shape2"], ["nothing2"]),
             helper.make_node("Add", ["nothing3", "box"], ["boxes"]),
             helper.make_node("Add", ["nothing2", "score"], ["scores"])]
    graph = helper.make_graph(
        nodes, "fixed-box",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 1, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 1])], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
