"""ONNX graphs built here, with no converter installed (no side effects on import, so the
benchmarks use them too)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper


def zipmap_classifier(weights: np.ndarray) -> bytes:
    """A linear classifier as sklearn-onnx converts one by default: ``x`` (N, features) ->
    ``label`` and the softmax of ``x @ weights.T`` as a ZipMap, one {class: probability}
    map per row. ``weights``: (classes, features)."""
    classes, features = weights.shape
    nodes = [
        helper.make_node(
            "LinearClassifier",
            ["x"],
            ["label", "scores"],
            domain="ai.onnx.ml",
            coefficients=weights.astype(np.float32).ravel().tolist(),
            intercepts=[0.0] * classes,
            classlabels_ints=list(range(classes)),
            post_transform="SOFTMAX",
        ),
        helper.make_node(
            "ZipMap",
            ["scores"],
            ["probabilities"],
            domain="ai.onnx.ml",
            classlabels_int64s=list(range(classes)),
        ),
    ]
    maps = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(1, []))
    )
    graph = helper.make_graph(
        nodes,
        "zipmap_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_value_info("probabilities", maps),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
