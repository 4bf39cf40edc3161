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
    assert ('medexplain_http_requests_total{code="200",handler="/models",method="GET",'
            'model=""}') in text
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
                     "target", "region_threshold", "score_threshold", "dicom", "preview"}
    # The server refuses unknown form fields; the file part is one of the image types.
    form = body["multipart/form-data"]
    assert form["schema"]["additionalProperties"] is False
    assert form["encoding"] == {"file": {"contentType": "application/dicom, image/png, "
                                                        "image/jpeg"}}
    # DICOM answers need a DICOM upload: /explain/dicom takes nothing else.
    dicom = spec["paths"]["/explain/dicom"]["post"]["requestBody"]["content"]
    assert set(dicom) == {"multipart/form-data", "application/dicom"}
    assert dicom["multipart/form-data"]["encoding"]["file"]["contentType"] == "application/dicom"


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
    with (pytest.raises(ModelError, match="holds no folder with a model.toml"),
          TestClient(create_app(Settings(models=tmp_path)))):
        pass
    root = _repo(tmp_path, ["one"])
    with (pytest.raises(ModelError, match="default model 'two' is not in one"),
          TestClient(create_app(Settings(models=root, default_model="two")))):
        pass
    toml = root / "one" / "model.toml"
    toml.write_text(toml.read_text().replace('"Pneumothorax"]', '"Pneumothorax", "Extra"]'))
    with (pytest.raises(ModelError, match="4 outputs but model.toml lists 5 labels"),
          TestClient(create_app(Settings(models=root)))):
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
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_methods_a_model_cannot_serve_are_listed_with_the_reason(tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    root = _repo(tmp_path, ["contrib"])
    path = root / "contrib" / "model.onnx"
    model = onnx.load(path)
    # An op without a gradient rule (or a fixations rule) early in the backbone: a contrib
    # op ONNX Runtime runs (and shape inference does not know, hence the value_info). The
    # head still compiles, so Grad-CAM and CRM serve; the whole-network methods cannot.
    first = next(n for n in model.graph.node if n.op_type == "Relu")
    first.input[0], original = "gelu_out", first.input[0]
    inferred = onnx.shape_inference.infer_shapes(model)
    (info,) = [v for v in inferred.graph.value_info if v.name == original]
    info.name = "gelu_out"
    model.graph.value_info.append(info)
    model.graph.node.insert(list(model.graph.node).index(first),
                            helper.make_node("Gelu", [original], ["gelu_out"], name="the_gelu",
                                             domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, path)
    with TestClient(create_app(Settings(models=root, threads=1))) as c:
        info = c.get("/models/contrib").json()
        assert info["methods"] == ["crm", "crm_combined", "gradcam"]
        assert set(info["unavailable_methods"]) == {"guided_backprop", "guided_gradcam",
                                                    "fixations", "fixations_summed"}
        assert "com.microsoft:Gelu (the_gelu)" in info["unavailable_methods"]["guided_backprop"]
        assert "Gelu" in info["unavailable_methods"]["fixations"]
        image = (ROOT / "tests/data/phantoms/nodule.png").read_bytes()
        ok = c.post("/explain", params={"methods": "gradcam"}, content=image,
                    headers={"content-type": "image/png"})
        assert ok.status_code == 200
        r = c.post("/explain", params={"methods": "gradcam,guided_gradcam"}, content=image,
                   headers={"content-type": "image/png"})
        assert r.status_code == 422 and r.json()["code"] == "unknown_method"
        assert "no gradient rule for op type(s) com.microsoft:Gelu" in r.json()["detail"]


def test_a_head_without_gradient_rules_still_predicts_and_serves_crm(tmp_path: Path) -> None:
    """An op ONNX Runtime runs but no rule differentiates, in the head: the model loads,
    predicts and serves CRM; the methods that differentiate are listed with the op."""
    import base64
    import io

    import numpy as np
    import onnx

    from tests import handmade

    h = handmade.build("contrib_head")
    folder = tmp_path / "contrib"
    folder.mkdir()
    onnx.save(h.model, folder / "model.onnx")
    (folder / "model.toml").write_text(
        'labels = ["a", "b", "c"]\n[input]\nsize = [5, 4]\nchannels = 3\n'
        '[output]\nactivation = "sigmoid"\n')
    image = (ROOT / "tests/data/phantoms/nodule.png").read_bytes()
    png = {"content-type": "image/png"}
    with TestClient(create_app(Settings(models=tmp_path, threads=1))) as c:
        info = c.get("/models/contrib").json()
        assert info["methods"] == ["crm", "crm_combined"]
        unavailable = info["unavailable_methods"]
        assert set(unavailable) == {"gradcam", "guided_backprop", "guided_gradcam", "fixations",
                                    "fixations_summed"}
        for name in ("gradcam", "guided_gradcam"):
            assert unavailable[name].startswith("no head VJP graph: no gradient rule")
            assert "com.microsoft:Gelu (fused_gelu)" in unavailable[name]
        assert "com.microsoft:Gelu (fused_gelu)" in unavailable["guided_backprop"]

        predicted = c.post("/predict", content=image, headers=png)
        assert predicted.status_code == 200, predicted.text
        scores = [p["score"] for p in predicted.json()["predictions"]]
        assert len(scores) == 3 and all(0 < s < 1 for s in scores)

        r = c.post("/explain", params={"methods": "crm,crm_combined", "heatmap": "npy",
                                       "size": "feature", "classes": "a,c"},
                   content=image, headers=png)
        assert r.status_code == 200, r.text
        maps = r.json()["explanations"]
        assert [(m["method"], m["label"]) for m in maps] == [
            ("crm", "a"), ("crm", "c"), ("crm_combined", None)]
        for m in maps:
            values = np.load(io.BytesIO(base64.b64decode(m["heatmap"]["data"])),
                             allow_pickle=False)
            assert values.shape == (handmade.H, handmade.W) and np.isfinite(values).all()

        refused = c.post("/explain", params={"methods": "gradcam"}, content=image, headers=png)
        assert refused.status_code == 422 and refused.json()["code"] == "unknown_method"
        assert "no head VJP graph" in refused.json()["detail"]
        assert "com.microsoft:Gelu" in refused.json()["detail"]
