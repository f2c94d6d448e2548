"""Helpers shared by the hospital-runtime tests: small real ONNX models built with onnx.helper."""

import json

import numpy as np
import onnx


def tiny_classifier(path, n_out, classes, expr="sigmoid"):
    """A real ONNX classifier graph (onnx.helper) with raycxr metadata, whose output is chosen by the test."""
    from onnx import TensorProto, helper

    from raycxr.export import write_metadata

    w = helper.make_tensor("w", TensorProto.FLOAT, [64 * 64, n_out], np.full(64 * 64 * n_out, 1e-3, np.float32))
    nodes = [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logit"])]
    if expr == "nan":  # 0 / 0
        nodes += [helper.make_node("Sub", ["logit", "logit"], ["zero"]),
                  helper.make_node("Div", ["zero", "zero"], ["probabilities"])]
    else:
        nodes += [helper.make_node("Sigmoid", ["logit"], ["probabilities"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            ["batch", 1, 64, 64])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", "c"])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    write_metadata(path, {"raycxr.kind": "classifier", "raycxr.class_names": json.dumps(classes),
                          "raycxr.input_size": "64", "raycxr.model_version": "tiny-1",
                          "raycxr.thresholds": json.dumps([0.5] * len(classes))}, "tiny")
    return path
