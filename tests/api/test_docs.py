"""The API documentation as integrators meet it: /docs and /redoc render from the
service's own assets (no outside request), the OpenAPI document declares what is sent
(problem+json errors, DICOM answers as bytes, readable operationIds), a client generated
from the committed document by openapi-python-client calls the service, and CORS is off
unless configured."""

from __future__ import annotations

import importlib
import io
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlparse

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.api.conftest import ROOT
from tests.api.live import live_server

MODELS = ROOT / "models"
PHANTOMS = ROOT / "tests" / "data" / "phantoms"
DICOM = ROOT / "tests" / "data" / "dicom" / "phantom_nodule.dcm"
OPENAPI = ROOT / "openapi" / "openapi.json"
GENERATOR_CONFIG = ROOT / "openapi" / "openapi-python-client.yaml"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server() as live:
        yield f"http://127.0.0.1:{live.port}"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_render_from_the_service_alone(server: str, page: str) -> None:
    html = httpx.get(f"{server}{page}").text
    # No absolute URL to any other host: scripts, styles, fonts, favicon, validator.
    for url in re.findall(r"""(?:https?:)?//[^\s"'<>)]+""", html):
        assert urlparse(url).hostname == "127.0.0.1", f"{page} references {url}"
    referenced = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    referenced += re.findall(r"""(?:url|spec-url)\s*[:=]\s*["']([^"']+)["']""", html)
    assert "/openapi.json" in referenced
    assert any(r.endswith(".js") for r in referenced)
    for ref in referenced:
        answer = httpx.get(urljoin(f"{server}{page}", ref))
        assert answer.status_code == 200, ref
        assert len(answer.content) > 1000, ref
        if ref.endswith(".js"):
            assert "javascript" in answer.headers["content-type"]
        if ref.endswith(".css"):
            assert answer.headers["content-type"].startswith("text/css")


def _responses(spec: dict[str, Any]) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                yield path, method, status, response


def test_openapi_declares_what_is_sent() -> None:
    spec = create_app(Settings(models=MODELS)).openapi()
    ids = {(p, m): o["operationId"] for p, item in spec["paths"].items()
           for m, o in item.items()}
    assert ids[("/explain", "post")] == "explain"
    assert ids[("/explain/dicom", "post")] == "explain_dicom"
    assert ids[("/predict", "post")] == "predict"
    assert ids[("/v2/models/{name}/infer", "post")] == "v2_model_infer"
    assert ids[("/v1/models/{name}:explain", "post")] == "v1_explain"
    assert len(set(ids.values())) == len(ids)
    # Every error a route raises is a problem (the health probes' 503s are their bodies).
    errors = [(p, m, s, r) for p, m, s, r in _responses(spec)
              if s[0] in "45" and not p.endswith(("/readyz", "/health/ready"))]
    assert len(errors) > 50
    for path, method, status, response in errors:
        assert response["content"] == {"application/problem+json": {
            "schema": {"$ref": "#/components/schemas/Problem"}}}, (path, method, status)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    # /explain's documented answer is JSON; the DICOM answers are their own operation's.
    assert set(spec["paths"]["/explain"]["post"]["responses"]["200"]["content"]) == {
        "application/json"}
    assert set(spec["paths"]["/explain/dicom"]["post"]["responses"]["200"]["content"]) == {
        "application/dicom", 'multipart/related; type="application/dicom"'}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The client openapi-python-client generates from the committed document."""
    folder = tmp_path_factory.mktemp("client")
    done = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(OPENAPI),
         "--config", str(GENERATOR_CONFIG), "--output-path", str(folder / "medexplain_client"),
         "--meta", "none"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("medexplain_client")
    finally:
        sys.path.remove(str(folder))
        for name in [n for n in sys.modules if n.split(".")[0] == "medexplain_client"]:
            del sys.modules[name]


def test_generated_client_calls_explain_and_predict(generated: Any, server: str) -> None:
    explain = importlib.import_module("medexplain_client.api.inference.explain")
    explain_dicom = importlib.import_module("medexplain_client.api.inference.explain_dicom")
    predict = importlib.import_module("medexplain_client.api.inference.predict")
    models = importlib.import_module("medexplain_client.models")
    types = importlib.import_module("medexplain_client.types")
    with generated.Client(base_url=server, timeout=httpx.Timeout(60)) as client:
        _calls(client, server, explain, explain_dicom, predict, models, types)


def _calls(client: Any, server: str, explain: Any, explain_dicom: Any, predict: Any,
           models: Any, types: Any) -> None:
    data = (PHANTOMS / "nodule.png").read_bytes()

    upload = models.ExplainFilesBody(file=types.File(payload=data, file_name="nodule.png",
                                                     mime_type="image/png"))
    answer = explain.sync(client=client, body=upload, methods="gradcam", classes="Nodule")
    assert isinstance(answer, models.ExplainResponse)
    direct = httpx.post(f"{server}/explain", content=data, timeout=60,
                        params={"methods": "gradcam", "classes": "Nodule"}).json()
    mine = answer.to_dict()
    assert {k: v for k, v in mine.items() if k != "timings_ms"} == {
        k: v for k, v in direct.items() if k != "timings_ms"}

    scores = predict.sync(client=client, body=models.PredictFilesBody(
        file=types.File(payload=data, file_name="nodule.png", mime_type="image/png")))
    assert isinstance(scores, models.PredictResponse)
    direct_scores = httpx.post(f"{server}/predict", content=data, timeout=60).json()
    assert [p.to_dict() for p in scores.predictions] == direct_scores["predictions"]

    problem = explain.sync(client=client, body=upload, methods="nope")
    assert isinstance(problem, models.Problem)
    assert (problem.status, problem.code) == (422, "unknown_method")

    # The DICOM answer comes back as bytes (a File), not parsed as JSON.
    dicom = explain_dicom.sync(client=client, methods="gradcam", body=types.File(
        payload=DICOM.read_bytes(), file_name="nodule.dcm", mime_type="application/dicom"))
    assert isinstance(dicom, types.File)
    capture = pydicom.dcmread(dicom.payload)
    assert capture.SOPClassUID.name == "Secondary Capture Image Storage"
    assert capture.StudyInstanceUID == pydicom.dcmread(DICOM).StudyInstanceUID


def _preflight(client: TestClient, origin: str) -> httpx.Response:
    return client.options("/explain", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-api-key"})


def test_cors_is_off_by_default(client: TestClient) -> None:
    answer = _preflight(client, "https://viewer.example.org")
    assert answer.status_code == 405
    assert "access-control-allow-origin" not in answer.headers
    simple = client.get("/models", headers={"Origin": "https://viewer.example.org"})
    assert "access-control-allow-origin" not in simple.headers


def test_cors_when_configured() -> None:
    settings = Settings(models=MODELS, threads=1,
                        cors_origins=("https://viewer.example.org",))
    with TestClient(create_app(settings)) as client:
        answer = _preflight(client, "https://viewer.example.org")
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://viewer.example.org"
        assert "POST" in answer.headers["access-control-allow-methods"]
        allowed = answer.headers["access-control-allow-headers"].lower()
        assert "content-type" in allowed and "x-api-key" in allowed
        other = _preflight(client, "https://elsewhere.example.org")
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers
        # Preflights are answered before the edge middleware: as every other answer all the
        # same, and a refusal as problem+json (Starlette's own is text/plain).
        assert other.headers["content-type"] == "application/problem+json"
        assert other.json()["code"] == "cors_refused"
        assert other.json()["detail"].startswith("Disallowed CORS origin")
        for preflight in (answer, other):
            assert preflight.headers["x-content-type-options"] == "nosniff"
            assert preflight.headers["cache-control"] == "no-store"
        simple = client.get("/models", headers={"Origin": "https://viewer.example.org"})
        assert simple.headers["access-control-allow-origin"] == "https://viewer.example.org"
        assert "retry-after" in simple.headers["access-control-expose-headers"].lower()


def test_cors_origins_are_checked() -> None:
    assert Settings.from_env({"MEDEXPLAIN_CORS_ORIGINS": "https://a.example, http://b:8080"}
                             ).cors_origins == ("https://a.example", "http://b:8080")
    with pytest.raises(ValueError, match="CORS origins are"):
        Settings(cors_origins=("https://a.example/path",))


def test_explain_dicom_answers_dicom_only(client: TestClient) -> None:
    dicom = DICOM.read_bytes()
    headers = {"content-type": "application/dicom"}
    capture = client.post("/explain/dicom", content=dicom, headers=headers,
                          params={"methods": "gradcam"})
    assert capture.status_code == 200
    assert capture.headers["content-type"] == "application/dicom"
    direct = client.post("/explain", content=dicom, params={"methods": "gradcam"},
                         headers={**headers, "accept": "application/dicom"})
    np.testing.assert_array_equal(pydicom.dcmread(io.BytesIO(capture.content)).pixel_array,
                                  pydicom.dcmread(io.BytesIO(direct.content)).pixel_array)
    parts = client.post("/explain/dicom", content=dicom, params={"methods": "gradcam,crm"},
                        headers={**headers,
                                 "accept": 'multipart/related; type="application/dicom"'})
    assert parts.headers["content-type"].startswith("multipart/related")
    png = (PHANTOMS / "nodule.png").read_bytes()
    # An Accept without DICOM: refused before the upload is read.
    refused = client.post("/explain/dicom", content=png, headers={"accept": "application/json"})
    assert refused.status_code == 406
    assert refused.json()["code"] == "not_acceptable"
    # A PNG, whatever its part or body says it is: the route takes DICOM only.
    for headers in ({}, {"content-type": "application/dicom"}):
        refused = client.post("/explain/dicom", content=png, headers=headers)
        assert refused.status_code == 415, refused.text
        assert refused.json()["code"] == "unsupported_media_type"
        assert "takes DICOM uploads only; this upload is png" in refused.json()["detail"]
    # A DICOM without what the Secondary Capture needs is still the answer's problem: 406.
    ds = pydicom.dcmread(DICOM)
    del ds.StudyInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf)
    refused = client.post("/explain/dicom", content=buf.getvalue(),
                          headers={"content-type": "application/dicom"})
    assert refused.status_code == 406, refused.text
    assert refused.json()["code"] == "not_acceptable"
