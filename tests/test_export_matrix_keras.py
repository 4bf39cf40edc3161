"""tools/export_matrix_keras.py's check of an export for TensorFlow ops left in the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tools import export_matrix_keras as ek


def _saved(tmp_path: Path, nodes: list[onnx.NodeProto]) -> Path:
    """image → ``nodes`` → y, as a file (what tf2onnx writes: unconverted TensorFlow ops
    stay nodes of the default domain, under their TensorFlow names)."""
    weight = numpy_helper.from_array(np.ones((2, 2, 1, 1), dtype=np.float32), "w")
    graph = helper.make_graph(
        nodes, "export",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3, 3])],
        initializer=[weight])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_tensorflow_ops_left_by_tf2onnx_are_counted(tmp_path: Path) -> None:
    path = _saved(tmp_path, [
        helper.make_node("StatefulPartitionedCall", ["image", "w"], ["conv"],
                         f="__inference__conv_xla_frozen_1"),
        helper.make_node("Erfc", ["conv"], ["e"]),
        helper.make_node("Erf", ["e"], ["f"]),
        helper.make_node("Erfc", ["f"], ["g"]),
        # ONNX Runtime's contrib domain is not ONNX's to judge.
        helper.make_node("FusedConv", ["g", "w"], ["y"], domain="com.microsoft"),
    ])
    assert ek.unconverted_ops(path) == {"StatefulPartitionedCall": 1, "Erfc": 2}
    assert set(ek.UNCONVERTED) >= {"StatefulPartitionedCall", "Erfc"}


def test_a_valid_export_has_none(tmp_path: Path) -> None:
    path = _saved(tmp_path, [helper.make_node("Conv", ["image", "w"], ["c"]),
                             helper.make_node("Erf", ["c"], ["y"])])
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert ek.unconverted_ops(path) == {}
