"""model.toml against the graph: what may be left out, and start-up errors that say what
to write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper

from service.config import Settings
from service.errors import CompileError, ModelError
from service.graph.build import RARELY_USED, Capability
from service.graph.cache import CompileCache
from service.graph.target import detect_layout
from service.main import create_app, open_repository
from service.models.activation import Activation
from service.models.repository import load_model
from service.models.spec import Layout
from service.runtime.sessions import make_session
from tests.api.conftest import MODELS

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "tests" / "data" / "zoo"
MANIFEST = json.loads((ZOO / "manifest.json").read_text())


def _folder(tmp_path: Path, zoo: str, *, layout: str | None = None,
            activation: str | None = None, size: tuple[int, int] | None = None) -> Path:
    """A model folder holding a zoo network and a model.toml with only the given keys."""
    meta = MANIFEST[zoo]
    folder = tmp_path / zoo
    folder.mkdir(parents=True)
    shutil.copy(ZOO / f"{zoo}.onnx", folder / "model.onnx")
    shape = meta["input_shape"]
    channels, hw = (shape[2], shape[:2]) if meta["layout"] == "NHWC" else (shape[0], shape[1:])
    hw = list(size) if size else hw
    lines = [f"labels = {json.dumps([f'c{i}' for i in range(meta['classes'])])}",
             "[input]", f"size = {hw}", f"channels = {channels}"]
    if layout:
        lines.append(f'layout = "{layout}"')
    if activation:
        lines += ["[output]", f'activation = "{activation}"']
    (folder / "model.toml").write_text("\n".join(lines) + "\n")
    return folder


def _load(folder: Path):  # type: ignore[no-untyped-def]
    return load_model(folder, providers=["CPUExecutionProvider"], threads=1, head_batch=64)


def test_layout_and_activation_come_from_the_graph(tmp_path: Path) -> None:
    """The NHWC zoo network ends in Softmax: model.toml need name neither."""
    loaded = _load(_folder(tmp_path, "nhwc"))
    assert loaded.config.input.layout is Layout.NHWC
    assert loaded.config.activation is Activation.SOFTMAX
    with TestClient(create_app(Settings(models=tmp_path, threads=1))) as client:
        png = (ROOT / "tests" / "data" / "phantoms" / "normal.png").read_bytes()
        r = client.post("/explain", content=png, headers={"content-type": "image/png"},
                        params={"methods": "gradcam,guided_backprop", "classes": "0"})
        assert r.status_code == 200, r.text
        assert abs(sum(p["score"] for p in r.json()["predictions"]) - 1) < 1e-4


def test_raw_logits_need_the_activation_written(tmp_path: Path) -> None:
    assert MANIFEST["resnet"]["final_activation"] == "none"
    with pytest.raises(ModelError, match='ends in raw logits.*write \\[output\\] activation = '
                                         '"sigmoid" \\(independent labels\\), "softmax"'):
        _load(_folder(tmp_path, "resnet"))
    assert _load(_folder(tmp_path / "ok", "resnet", activation="sigmoid")).config.activation \
        is Activation.SIGMOID


def test_a_written_layout_overrides_and_a_wrong_one_stops_the_start_up(tmp_path: Path) -> None:
    assert _load(_folder(tmp_path, "resnet", layout="NCHW", activation="none"))
    with pytest.raises(ModelError, match=r"resnet: the network does not take the input "
                                         r"model.toml describes \(NHWC 1×64×64×3\)"):
        _load(_folder(tmp_path / "wrong", "resnet", layout="NHWC", activation="none"))
    with pytest.raises(ModelError, match=r"does not take the input model.toml describes "
                                         r"\(NCHW 1×3×32×32\)"):
        _load(_folder(tmp_path / "small", "resnet", activation="none", size=(32, 32)))


def _graph(first: onnx.NodeProto | None, shape: list[int | str]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = first or helper.make_node("Relu", ["x"], ["y"])
    return helper.make_model(helper.make_graph([node], "g", [x], [y]))


@pytest.mark.parametrize(("node", "shape", "expected"), [
    (helper.make_node("Conv", ["x", "w"], ["y"]), [1, 3, 64, 64], Layout.NCHW),
    (helper.make_node("Transpose", ["x"], ["y"], perm=[0, 3, 1, 2]), [1, 64, 64, 3],
     Layout.NHWC),
    (None, [1, 224, 224, 3], Layout.NHWC),  # shape alone: channels last
    (None, ["N", 1, 256, 256], Layout.NCHW),
    (None, [1, 3, 3, 3], None),  # cannot tell
    (None, [1, 224, 224], None),
])
def test_detect_layout(node: onnx.NodeProto | None, shape: list[int | str],
                       expected: Layout | None) -> None:
    assert detect_layout(_graph(node, shape)) is expected


def test_an_undetectable_layout_must_be_written(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "resnet", activation="none")
    model = _graph(None, [1, 3, 3, 3])
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(ModelError, match='write input.layout = "NCHW" or "NHWC"'):
        _load(folder)


def test_keras_constant_inputs_are_named_with_the_fix(tmp_path: Path) -> None:
    """Keras 3's export leaves a Normalization layer's mean and variance as bare inputs."""
    folder = _folder(tmp_path, "nhwc")
    model = onnx.load(str(folder / "model.onnx"))
    image = model.graph.input[0].name
    mean = helper.make_tensor_value_info("normalization/mean", TensorProto.FLOAT, [1, 1, 1, 3])
    model.graph.input.append(mean)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == image:
                node.input[i] = "centred"
    model.graph.node.insert(0, helper.make_node("Sub", [image, "normalization/mean"],
                                                ["centred"]))
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(CompileError, match=r"inputs without values besides the image "
                                           r".*: normalization/mean\. Keras 3's model.export"):
        _load(folder)


def test_a_model_with_its_weights_in_an_external_data_file(tmp_path: Path) -> None:
    """torch's dynamo exporter writes model.onnx and model.onnx.data by default."""
    folder = _folder(tmp_path, "resnet", activation="none")
    onnx.save(onnx.load(str(folder / "model.onnx")), str(folder / "model.onnx"),
              save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    assert (folder / "model.onnx.data").stat().st_size > (folder / "model.onnx").stat().st_size
    inline = _load(_folder(tmp_path / "inline", "resnet", activation="none"))
    external = _load(folder)
    x = np.random.default_rng(0).normal(size=(1, *MANIFEST["resnet"]["input_shape"]))
    x = x.astype(np.float32)
    np.testing.assert_allclose(external.engine.forward(x)[1], inline.engine.forward(x)[1],
                               rtol=1e-6, atol=1e-6)
    assert sorted(external.unavailable) == sorted(inline.unavailable)


def test_two_models_that_differ_only_in_their_external_data(tmp_path: Path) -> None:
    """Two fine-tunings of one architecture exported by dynamo: the same model.onnx, other
    model.onnx.data. Each loads and computes with its own weights (the second used to be
    refused: the weights and the compile cache were keyed by model.onnx alone)."""
    folders = []
    for name in ("first", "second"):
        folder = _folder(tmp_path / name, "resnet", activation="none")
        model = onnx.load(str(folder / "model.onnx"))
        if name == "second":
            big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
            values = onnx.numpy_helper.to_array(big) * 0.5
            big.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), big.name))
        onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True,
                  location="model.onnx.data", size_threshold=1024)
        folders.append(folder)
    assert (folders[0] / "model.onnx").read_bytes() == (folders[1] / "model.onnx").read_bytes()
    first, second = (_load(f) for f in folders)
    assert first.sha256 != second.sha256
    x = np.random.default_rng(0).normal(size=(1, *MANIFEST["resnet"]["input_shape"]))
    x = x.astype(np.float32)
    for loaded, folder in zip((first, second), folders, strict=True):
        plain = make_session(str(folder / "model.onnx"), ["CPUExecutionProvider"], 1)
        expected = plain.run(None, {plain.get_inputs()[0].name: x})
        np.testing.assert_allclose(loaded.engine.forward(x)[1], expected[0].reshape(1, -1),
                                   rtol=1e-5, atol=1e-5)
    assert not np.allclose(first.engine.forward(x)[1], second.engine.forward(x)[1])


@pytest.mark.parametrize("lazy", [True, False])
def test_lazy_sessions_setting_reaches_every_engine(lazy: bool) -> None:
    repository = open_repository(Settings(models=MODELS, threads=1, lazy_sessions=lazy))
    for model in repository.models.values():
        opened = set(model.engine._sessions)
        rare = RARELY_USED & model.engine.available
        assert rare, "the demo model has guided and fixations graphs"
        assert opened.isdisjoint(rare) if lazy else rare <= opened



def test_a_loaded_model_knows_its_methods_before_assembling_its_rarely_used_graphs() -> None:
    """Availability (GET /models, /readyz) is decided at load; the guided and fixations
    graphs are assembled at their first run (test_build: as the eager build makes them),
    for their sessions, and not kept beside them."""
    loaded = load_model(MODELS / "demo-cxr", providers=["CPUExecutionProvider"], threads=1,
                        head_batch=256, cache=CompileCache())  # not the process's: unused
    graphs = loaded.engine.compiled.graphs
    assert loaded.unavailable == {} and set(graphs) == set(Capability)
    assert graphs.assembled == set(Capability) - RARELY_USED  # type: ignore[attr-defined]
    spec = loaded.config.input
    x = np.random.default_rng(2).normal(size=(1, 3, spec.height, spec.width)).astype(np.float32)
    grads = loaded.engine.guided(x, np.eye(len(loaded.config.labels), dtype=np.float32)[:1])[2]
    assert grads.shape == x.shape and np.abs(grads).max() > 0
    # Assembled for the session, whose graph then the compiled model no longer keeps.
    assert set(loaded.engine._sessions) == set(Capability) - {Capability.FIXATIONS}
    assert graphs.assembled == set(Capability) - RARELY_USED  # type: ignore[attr-defined]
    loaded.engine.all_activations(x)
    assert set(loaded.engine._sessions) == set(Capability)
    assert graphs.assembled == set(Capability) - RARELY_USED  # type: ignore[attr-defined]
