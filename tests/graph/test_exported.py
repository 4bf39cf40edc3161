"""Library architectures at narrow widths (timm ConvNeXt and GhostNet, torchvision
ShuffleNetV2 and MobileNetV3 through both torch exporters; Keras MobileNetV3 through tf2onnx
and Keras' own export: tests/data/exported, made by tools/make_exported_fixtures.py and
tools/make_exported_fixtures_keras.py), served as ``medexplain serve`` serves a model
folder: the loader, the service's preprocessing of 8-bit images, the batch pipeline and,
for one PNG per model, the HTTP app with the folder as its repository; against the
framework's own autograd in float64.

No torch or TensorFlow here: the references are the reference.npz beside each model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient

from service import pipeline
from service.config import Settings
from service.graph.target import detect_layout
from service.imaging.base import DecodedImage
from service.main import create_app
from service.methods import METHODS
from service.models.repository import LoadedModel, load_model
from tests.api.test_explain import _npy
from tests.graph.compare import load_npz, rel_err
from tests.runtime.test_batching import _assert_same, _options

EXPORTED = Path(__file__).resolve().parent.parent / "data" / "exported"
MANIFEST: dict[str, dict[str, object]] = json.loads((EXPORTED / "manifest.json").read_text())
NAMES = list(MANIFEST)
# The exactness the service promises for float32 graphs (DESIGN.md, "Non-negotiables").
SCORES_TOL = 1e-5
GRADCAM_TOL = 1e-4
GUIDED_TOL = 1e-3
CRM_TOL = 1e-4

by_name = pytest.mark.parametrize("name", NAMES, ids=NAMES)


@cache
def _model(name: str) -> LoadedModel:
    return load_model(EXPORTED / name, providers=["CPUExecutionProvider"], threads=1,
                      head_batch=64)


@cache
def _ref(name: str) -> dict[str, np.ndarray]:
    return load_npz(EXPORTED / name / "reference.npz")


def _available(name: str) -> tuple[str, ...]:
    unavailable = MANIFEST[name]["unavailable"]
    assert isinstance(unavailable, dict)
    return tuple(m for m in METHODS if m not in unavailable)


def _job(name: str, image: int, methods: tuple[str, ...]) -> pipeline.Job:
    """One image of the reference as the PNG decoder hands it over, every class asked."""
    model, ref = _model(name), _ref(name)
    pixels = ref["pixels"][image].astype(np.float32) / np.float32(255.0)
    classes = [str(k) for k in range(ref["logits"].shape[1])]
    return pipeline.prepare(model, DecodedImage(pixels, "png"), _options(methods, classes),
                            pipeline.Stopwatch())


def _maps(computed: pipeline.Computed | Exception, method: str) -> dict[int, np.ndarray]:
    assert isinstance(computed, pipeline.Computed), computed
    return {int(r.index): r.values for n, r in computed.raw if n == method}  # type: ignore[arg-type]


def _assert_close(got: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
    if not want.any():  # e.g. Grad-CAM's weighted sum negative everywhere: ours is 0 too
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.1e} > {tol:.0e}"


def test_the_set_holds_the_required_architectures_and_exporters() -> None:
    # ConvNeXt, ShuffleNet-V2 (legacy: chunk() as Shape-Gather-Div-Slice), GhostNet and
    # MobileNetV3 through both torch exporters; Keras' MobileNetV3 with its hard-swish
    # (x * relu6(x + 3) / 6: Clip) through tf2onnx and Keras' own export.
    for arch in ("convnext", "convnext_cl", "shufflenet_v2", "ghostnet", "mobilenet_v3"):
        for exporter in ("legacy", "dynamo"):
            assert f"{arch}-{exporter}" in MANIFEST
    for exporter in ("tf2onnx", "keras"):
        meta = MANIFEST[f"keras_mobilenet_v3-{exporter}"]
        assert meta["input_shape"] == [64, 64, 3] and "Clip" in meta["ops"]  # type: ignore[operator]
    legacy = MANIFEST["shufflenet_v2-legacy"]["ops"]
    assert isinstance(legacy, dict)
    assert {"Shape", "Gather", "Div", "Slice"} <= set(legacy)


def test_the_tools_that_made_them_import_without_their_frameworks() -> None:
    code = ("import sys; import tools.make_exported_fixtures, tools.make_exported_fixtures_keras;"
            " sys.exit(1 if {'torch', 'tensorflow', 'keras'} & set(sys.modules) else 0)")
    root = Path(__file__).resolve().parent.parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


@by_name
def test_loads_with_exactly_the_expected_methods(name: str) -> None:
    model, meta = _model(name), MANIFEST[name]
    # model.toml states the layout, and it is the one the graph shows: the key may go.
    graph = onnx.load(str(EXPORTED / name / "model.onnx"), load_external_data=False)
    assert detect_layout(graph) is model.config.input.layout
    assert model.unavailable == meta["unavailable"]
    assert model.engine.split.target == meta["target"]
    assert list(model.engine.split.target_shape) == meta["target_shape"]


@by_name
def test_one_image_matches_autograd(name: str) -> None:
    ref = _ref(name)
    methods = ("gradcam", "guided_backprop", "crm")
    for image in range(len(ref["pixels"])):
        (computed,) = pipeline.compute(_model(name), [_job(name, image, methods)])
        assert isinstance(computed, pipeline.Computed)
        scores = 1.0 / (1.0 + np.exp(-ref["logits"][image]))
        err = rel_err(computed.scores, scores)
        assert err <= SCORES_TOL, f"{name} image {image}: scores relative error {err:.1e}"
        cams = _maps(computed, "gradcam")
        for k, want in enumerate(ref["gradcam"][image]):
            _assert_close(cams[k], want, GRADCAM_TOL, f"{name} image {image} class {k} Grad-CAM")
        crms = _maps(computed, "crm")
        for k, want in enumerate(ref["crm"][image]):
            _assert_close(crms[k], want, CRM_TOL, f"{name} image {image} class {k} CRM")
        top = int(ref["guided_class"][image])
        _assert_close(_maps(computed, "guided_backprop")[top], ref["guided"][image], GUIDED_TOL,
                      f"{name} image {image} class {top} guided")


@by_name
def test_a_batch_of_two_answers_what_each_image_would_alone(name: str) -> None:
    methods = _available(name)
    jobs = [_job(name, image, methods) for image in range(2)]
    batched = pipeline.compute(_model(name), jobs)
    for image, got in enumerate(batched):
        (alone,) = pipeline.compute(_model(name), [_job(name, image, methods)])
        _assert_same(got, alone)
        # Every method answered, per class where it is per class.
        k = _ref(name)["logits"].shape[1]
        assert [n for n, _ in got.raw] == [m for m in methods  # type: ignore[union-attr]
                                           for _ in range(k if METHODS[m].per_class else 1)]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """The service with the exported folder as its model repository."""
    with TestClient(create_app(Settings(models=EXPORTED, threads=1))) as c:
        yield c


@by_name
def test_over_http_a_png_upload_gets_the_references(client: TestClient, name: str) -> None:
    ref = _ref(name)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(ref["pixels"][0][..., ::-1]))  # BGR
    assert ok
    top = int(ref["guided_class"][0])
    for method, size, want, tol in (("gradcam", "feature", ref["gradcam"][0, top], GRADCAM_TOL),
                                    ("guided_backprop", "model", ref["guided"][0], GUIDED_TOL)):
        r = client.post("/explain", files={"file": ("noise.png", png.tobytes(), "image/png")},
                        data={"model": name, "methods": method, "classes": str(top),
                              "heatmap": "npy", "size": size})
        assert r.status_code == 200, r.text
        body = r.json()
        scores = np.array([p["score"] for p in body["predictions"]])
        err = rel_err(scores, 1.0 / (1.0 + np.exp(-ref["logits"][0])))
        assert err <= SCORES_TOL, f"{name}: scores relative error {err:.1e}"
        (explanation,) = body["explanations"]
        assert explanation["index"] == top
        _assert_close(_npy(explanation["heatmap"]["data"]), want, tol, f"{name} {method}")
