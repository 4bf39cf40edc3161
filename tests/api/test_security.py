"""Security at the edge, in process: headers on every answer, the web page's CSP, API keys
for /metrics and /docs when configured, securitySchemes in OpenAPI, a refused upload
closing its connection, and the request timeout."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.api.admission import Admission
from service.config import Settings, ValidationError
from service.main import create_app
from tests.api.conftest import MODELS, assert_problem, phantom_bytes

KEY = "security-test-key-0123456789"
PNG = {"content-type": "image/png"}


def test_results_are_not_cached_nor_sniffed(client: TestClient) -> None:
    for r in (client.post("/explain", content=phantom_bytes("normal.png"), headers=PNG),
              client.post("/predict", content=b"\x89PNG broken", headers=PNG),
              client.get("/models")):
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["x-content-type-options"] == "nosniff"


def test_the_web_page_runs_only_its_own_script_and_style(client: TestClient) -> None:
    r = client.get("/")
    policy = r.headers["content-security-policy"]
    assert "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy
    assert "script-src 'self'" in policy and "style-src 'self'" in policy
    # Nothing inline for the policy to refuse: scripts and styles are files of the origin.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>|<style\b|\sstyle=|\son\w+=", r.text)


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models=MODELS, threads=1, api_keys=(KEY,),
                                        protect_metrics=True, protect_docs=True))) as c:
        yield c


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json"])
def test_metrics_and_docs_need_a_key_when_protected(keyed: TestClient, path: str) -> None:
    assert_problem(keyed.get(path), 401, "unauthorized")
    assert_problem(keyed.get(path, headers={"x-api-key": "x" * 20}), 401, "unauthorized")
    assert keyed.get(path, headers={"x-api-key": KEY}).status_code == 200
    assert keyed.get(path, headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    assert keyed.get("/healthz").status_code == 200  # probes never need one


def test_metrics_and_docs_stay_open_unless_protected() -> None:
    with TestClient(create_app(Settings(models=MODELS, threads=1, api_keys=(KEY,)))) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/openapi.json").status_code == 200
        assert_problem(c.get("/models"), 401, "unauthorized")


def test_a_refused_upload_closes_the_connection(keyed: TestClient) -> None:
    r = keyed.post("/predict", content=phantom_bytes("normal.png"), headers=PNG)
    assert_problem(r, 401, "unauthorized")
    assert r.headers["connection"] == "close"  # its body was never read


def test_openapi_declares_the_key_schemes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                   "description": "required when the service has API keys configured"},
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "the same API key as `Authorization: Bearer <key>`"},
    }
    for path in ("/explain", "/predict"):
        assert spec["paths"][path]["post"]["security"] == [{"apiKey": []}, {"bearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_a_request_past_its_timeout_gets_503_and_its_bytes_come_back() -> None:
    settings = Settings(models=MODELS, threads=1, request_timeout_s=0.001)
    admission = Admission(settings)
    with TestClient(create_app(settings, admission=admission)) as c:
        r = c.post("/explain", content=phantom_bytes("all-findings.png"), headers=PNG,
                   params={"methods": "gradcam,crm,guided_gradcam,fixations"})
        assert_problem(r, 503, "compute_timeout")
        assert r.headers["retry-after"] == "1"
        # The compute went on in its thread; what it held is released when it ends.
        deadline = time.monotonic() + 30
        while admission.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (admission.requests, admission.bytes) == (0, 0)


def test_the_bytes_budget_must_hold_the_largest_upload() -> None:
    with pytest.raises(ValidationError, match="max_inflight_bytes must be at least"):
        Settings(max_upload_bytes=2**20, max_inflight_bytes=2**19)
    assert Settings(max_upload_bytes=2**20, max_inflight_bytes=2**20).max_inflight_bytes == 2**20
