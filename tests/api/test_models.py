"""/models, health, metrics, the OpenAPI document, and model-repository rules."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.errors import ModelError
from service.main import create_app
from tests.api.conftest import MODELS, ROOT


def test_models_lists_the_demo_model(client: TestClient) -> None:
    body = client.get("/models").json()
    assert body["default"] == "demo-cxr"
    (info,) = body["models"]
    assert info == client.get("/models/demo-cxr").json()
    assert info["labels"] == ["Cardiomegaly", "Nodule", "Pleural Effusion", "Pneumothorax"]
    assert info["input"] == {"size": [256, 256], "channels": 3,
                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                             "layout": "NCHW"}
    assert info["activation"] == "sigmoid"
    assert info["target_layer"]["detected"] is True
    assert info["target_layer"]["shape"][1:] == [16, 16]
    assert set(info["methods"]) >= {"gradcam", "crm", "crm_combined"}
    # No GPU on this machine: the CPU provider was chosen, and /models says so.
    assert info["execution_providers"] == ["CPUExecutionProvider"]
    assert "synthetic" in info["description"].lower()
    assert "not for diagnosis" in info["description"].lower()


def test_health_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    client.get("/models")
    text = client.get("/metrics").text
    assert 'medexplain_requests_total{route="/models",status="200"}' in text
    assert "medexplain_pending_requests 0.0" in text


def test_openapi_document_is_current() -> None:
    committed = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    generated = json.loads(json.dumps(create_app(Settings(models=MODELS)).openapi()))
    assert committed == generated, "openapi/openapi.json is stale: run `make openapi`"


def test_openapi_documents_uploads() -> None:
    spec = create_app(Settings(models=MODELS)).openapi()
    body = spec["paths"]["/explain"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/dicom", "image/png", "image/jpeg"}
    names = {p["name"] for p in spec["paths"]["/explain"]["post"]["parameters"]}
    assert names == {"model", "frame", "window", "methods", "classes", "heatmap", "size",
                     "target", "region_threshold", "score_threshold", "dicom"}


def _repo(tmp_path: Path, names: list[str]) -> Path:
    for name in names:
        folder = tmp_path / name
        shutil.copytree(MODELS / "demo-cxr", folder)
        toml = (folder / "model.toml").read_text().replace('name = "demo-cxr"', f'name = "{name}"')
        (folder / "model.toml").write_text(toml)
    return tmp_path


def test_default_model_is_first_by_name_or_configured(tmp_path: Path) -> None:
    root = _repo(tmp_path, ["zeta", "alpha"])
    with TestClient(create_app(Settings(models=root, threads=1))) as c:
        assert c.get("/models").json()["default"] == "alpha"
    with TestClient(create_app(Settings(models=root, default_model="zeta", threads=1))) as c:
        assert c.get("/models").json()["default"] == "zeta"
        r = c.post("/predict", params={"model": "alpha"},
                   content=(ROOT / "tests/data/phantoms/normal.png").read_bytes(),
                   headers={"content-type": "image/png"})
        assert r.json()["model"]["name"] == "alpha"


def test_bad_repositories_fail_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="holds no folder with a model.toml"):
        with TestClient(create_app(Settings(models=tmp_path))):
            pass
    root = _repo(tmp_path, ["one"])
    with pytest.raises(ModelError, match="default model 'two' is not in one"):
        with TestClient(create_app(Settings(models=root, default_model="two"))):
            pass
    toml = root / "one" / "model.toml"
    toml.write_text(toml.read_text().replace('"Pneumothorax"]', '"Pneumothorax", "Extra"]'))
    with pytest.raises(ModelError, match="4 outputs but model.toml lists 5 labels"):
        with TestClient(create_app(Settings(models=root))):
            pass


def test_settings_from_environment() -> None:
    s = Settings.from_env({"MEDEXPLAIN_PORT": "9000", "MEDEXPLAIN_API_KEYS": "a" * 16 + ", " + "b" * 16,
                           "MEDEXPLAIN_DEFAULT_MODEL": "x"}, host="0.0.0.0")
    assert (s.port, s.host, s.default_model) == (9000, "0.0.0.0", "x")
    assert s.api_keys == ("a" * 16, "b" * 16)
    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings.from_env({"MEDEXPLAIN_API_KEYS": "short"})


def test_service_never_imports_torch() -> None:
    code = ("import sys, service.main, service.cli, service.pipeline, tools.phantoms;"
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_methods_a_model_cannot_serve_are_listed_with_the_reason(tmp_path: Path) -> None:
    import onnx  # noqa: PLC0415
    from onnx import helper  # noqa: PLC0415

    root = _repo(tmp_path, ["erf"])
    path = root / "erf" / "model.onnx"
    model = onnx.load(path)
    # An op without a gradient rule (or a fixations rule) early in the backbone: the head
    # still compiles, so Grad-CAM and CRM serve; the whole-network methods cannot.
    first = next(n for n in model.graph.node if n.op_type == "Relu")
    first.input[0], original = "erf_out", first.input[0]
    model.graph.node.insert(list(model.graph.node).index(first),
                            helper.make_node("Erf", [original], ["erf_out"], name="the_erf"))
    onnx.save(model, path)
    with TestClient(create_app(Settings(models=root, threads=1))) as c:
        info = c.get("/models/erf").json()
        assert info["methods"] == ["crm", "crm_combined", "gradcam"]
        assert set(info["unavailable_methods"]) == {"guided_backprop", "guided_gradcam",
                                                    "fixations"}
        assert "Erf (the_erf)" in info["unavailable_methods"]["guided_backprop"]
        assert "Erf" in info["unavailable_methods"]["fixations"]
        image = (ROOT / "tests/data/phantoms/nodule.png").read_bytes()
        ok = c.post("/explain", params={"methods": "gradcam"}, content=image,
                    headers={"content-type": "image/png"})
        assert ok.status_code == 200
        r = c.post("/explain", params={"methods": "gradcam,guided_gradcam"}, content=image,
                   headers={"content-type": "image/png"})
        assert r.status_code == 422 and r.json()["code"] == "unknown_method"
        assert "no gradient rule for op type(s) Erf" in r.json()["detail"]
