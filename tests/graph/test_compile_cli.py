"""`medexplain compile` and the compile cache."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from service import cli
from service.graph import cache as cache_module
from service.graph.cache import CompileCache
from service.models.spec import Layout
from service.runtime.sessions import make_session
from tests import handmade

ZOO = Path(__file__).resolve().parents[1] / "data" / "zoo"


def test_compile_writes_graphs_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = json.loads((ZOO / "manifest.json").read_text())
    assert cli.main(["compile", str(ZOO / "resnet.onnx"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    source = onnx.load(ZOO / "resnet.onnx")
    assert report["source"]["ops"] == dict(Counter(n.op_type for n in source.graph.node))
    assert report["target_layer"]["name"] == manifest["resnet"]["target"]
    assert report["target_layer"]["name"] in out
    assert report["graphs"]["guided"]["outputs"][-1] == "xai/guided/grad/image"
    for name in ("backbone", "head", "head_vjp", "guided"):
        graph = onnx.load(tmp_path / f"{name}.onnx")
        onnx.checker.check_model(graph, full_check=True)
        assert report["graphs"][name]["nodes"] == len(graph.graph.node)
    # The written guided graph runs on its own and yields the reference guided gradient.
    ref = np.load(ZOO / "resnet.npz")
    session = make_session(str(tmp_path / "guided.onnx"), ["CPUExecutionProvider"], 1)
    seed = np.eye(ref["logits"].shape[-1], dtype=np.float32)[:1]
    (grad,) = session.run(["xai/guided/grad/image"],
                          {"image": ref["x"].astype(np.float32), "xai/guided/seed": seed})
    expected = ref["guided_input"][0]
    assert np.abs(grad[0] - expected).max() / np.abs(expected).max() < 1e-4


def test_compile_reports_a_head_without_gradient_rules(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An op no rule covers after the logits' Gemm: the compile succeeds without the
    gradient graphs, and says why."""
    model = onnx.load(ZOO / "resnet.onnx")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    out_name = gemm.output[0]
    gemm.output[0] = "pre_gelu"
    model.graph.node.append(onnx.helper.make_node("Gelu", ["pre_gelu"], [out_name],
                                                  domain="com.microsoft", name="fused"))
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    path = tmp_path / "contrib.onnx"
    onnx.save(model, path)
    assert cli.main(["compile", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "no head VJP graph (no Grad-CAM, Guided Grad-CAM): no gradient rule for op type(s) " \
           "com.microsoft:Gelu; nodes: com.microsoft:Gelu (fused)" in out
    assert "no guided graph: no gradient rule" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "com.microsoft:Gelu (fused)" in report["head_vjp"]
    assert "com.microsoft:Gelu (fused)" in report["guided"]
    assert report["fixations"]
    # The head from its GlobalAveragePool on runs in ONNX Runtime, Gelu and all.
    assert set(report["graphs"]) == {"backbone", "head", "pooled_head"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "backbone.onnx", "head.onnx", "pooled_head.onnx", "report.json"]


def test_cache_keeps_a_missing_head_vjp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model without a head VJP comes back from the disk cache without one, with the
    reason."""
    h = handmade.build("contrib_head")
    raw = h.model.SerializeToString()
    first = CompileCache(tmp_path).compile(raw, h.model, layout=Layout.NCHW, activation=None,
                                           target_layer=None)
    assert first.head_vjp is None and first.head_vjp_error
    monkeypatch.setattr(cache_module, "compile_model", None)  # a call would raise
    again = CompileCache(tmp_path).compile(raw, h.model, layout=Layout.NCHW, activation=None,
                                           target_layer=None)
    assert again.head_vjp is None and again.head_vjp_error == first.head_vjp_error
    assert set(again.graphs) == set(first.graphs) == {"backbone", "head", "pooled_head"}
    assert again.guided_error == first.guided_error
    assert again.fixations_error == first.fixations_error


def test_cache_hits_memory_then_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = (ZOO / "densenet.onnx").read_bytes()
    model = onnx.load_from_string(raw)
    first = CompileCache(tmp_path).compile(raw, model, layout=Layout.NCHW, activation=None,
                                           target_layer=None)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled again despite the cache")

    monkeypatch.setattr(cache_module, "compile_model", refuse)
    again = CompileCache(tmp_path).compile(raw, model, layout=Layout.NCHW, activation=None,
                                           target_layer=None)
    assert again.split == first.split
    for name, graph in first.graphs.items():
        assert again.graphs[name].SerializeToString() == graph.SerializeToString()
    memory = CompileCache(None)
    with pytest.raises(AssertionError, match="compiled again"):
        memory.compile(raw, model, layout=Layout.NCHW, activation=None, target_layer=None)
    # Another target layer is another entry.
    with pytest.raises(AssertionError, match="compiled again"):
        CompileCache(tmp_path).compile(raw, model, layout=Layout.NCHW, activation=None,
                                       target_layer=first.split.logits)


def test_compile_reads_the_layout_from_the_graph(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """No --layout: the NHWC zoo network is compiled as NHWC, as the service loads it."""
    assert cli.main(["compile", str(ZOO / "nhwc.onnx"), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["target_layer"]["layout"] == Layout.NHWC.value
    assert "image input NHWC (as the graph shows it)" in capsys.readouterr().out
