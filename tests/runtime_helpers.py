"""Helpers shared by the hospital-runtime tests: small real ONNX models built with onnx.helper."""

import json

import numpy as np
import onnx


def tiny_classifier(path, n_out, classes, expr="sigmoid", thresholds=None, weight=1e-3):
    """A real ONNX classifier graph (onnx.helper) with raycxr metadata, whose output is chosen by the test.

    ``expr``: "sigmoid" (probabilities), "logit" (no sigmoid), "nan" (NaN for every image), "nan_dark"
    (NaN for images whose mean is below 0.25, finite for the runtime's load probe, a ramp of mean 0.5)."""
    from onnx import TensorProto, helper

    from raycxr.export import write_metadata

    w = helper.make_tensor("w", TensorProto.FLOAT, [64 * 64, n_out], np.full(64 * 64 * n_out, weight, np.float32))
    nodes = [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logit"])]
    if expr == "nan":  # 0 / 0
        nodes += [helper.make_node("Sub", ["logit", "logit"], ["zero"]),
                  helper.make_node("Div", ["zero", "zero"], ["probabilities"])]
    elif expr == "nan_dark":  # sigmoid + 0 * sqrt(mean - 0.25): NaN where the mean is below 0.25
        nodes += [helper.make_node("Sigmoid", ["logit"], ["sig"]),
                  helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=0),
                  helper.make_node("Sub", ["mean", "quarter"], ["centred"]),
                  helper.make_node("Sqrt", ["centred"], ["root"]),
                  helper.make_node("Mul", ["root", "zero"], ["nan_or_zero"]),
                  helper.make_node("Unsqueeze", ["nan_or_zero", "axis1"], ["column"]),
                  helper.make_node("Add", ["sig", "column"], ["probabilities"])]
    elif expr == "logit":  # no sigmoid: values outside [0, 1]
        nodes += [helper.make_node("Identity", ["logit"], ["probabilities"])]
    else:
        nodes += [helper.make_node("Sigmoid", ["logit"], ["probabilities"])]
    consts = [helper.make_tensor("quarter", TensorProto.FLOAT, [], [0.25]),
              helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
              helper.make_tensor("axis1", TensorProto.INT64, [1], [1])] if expr == "nan_dark" else []
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            ["batch", 1, 64, 64])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", "c"])],
                              [w, *consts])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    write_metadata(path, {"raycxr.kind": "classifier", "raycxr.class_names": json.dumps(classes),
                          "raycxr.input_size": "64", "raycxr.model_version": "tiny-1",
                          "raycxr.thresholds": json.dumps([0.5] * len(classes) if thresholds is None
                                                          else thresholds)}, "tiny")
    return path


def sr_receiver(ae_title: str = "TESTPACS", contexts=None, ssl_context=None):
    """A pynetdicom storage SCP on 127.0.0.1 standing in for the PACS that receives SRs: ``(server,
    received)``, every stored data set (with its file meta) appended to ``received``. Shut it down with
    ``server.shutdown()``. ``contexts``: abstract syntaxes it accepts (default: Comprehensive SR)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage

    received = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title=ae_title)
    for cx in contexts or (ComprehensiveSRStorage,):
        ae.add_supported_context(cx)
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ssl_context,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, received
