"""/metrics follows Prometheus conventions: ``code``, ``method`` and ``model`` labels on
the HTTP metrics, the standard ``process_*`` collectors and ``medexplain_build_info``."""

from __future__ import annotations

import base64
import platform
import re
from collections.abc import Iterator

import onnxruntime
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service import __version__
from service.config import Settings
from service.main import create_app
from tests.api.conftest import DATA, MODELS


@pytest.fixture
def fresh() -> Iterator[TestClient]:
    """An app of its own: counts start at zero."""
    with TestClient(create_app(Settings(models=MODELS, threads=1))) as c:
        yield c


def _samples(client: TestClient, headers: dict[str, str] | None = None
             ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics", headers=headers).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_http_metrics_labels(fresh: TestClient) -> None:
    png = (DATA / "phantoms" / "nodule.png").read_bytes()
    for _ in range(2):
        assert fresh.post("/predict", content=png).status_code == 200
    # A model name the client made up never becomes a label value.
    assert fresh.post("/predict", content=png, params={"model": "made-up"}).status_code == 404
    assert fresh.get("/v2/models/demo-cxr").status_code == 200
    infer = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                         "data": [base64.b64encode(png).decode()]}],
             "parameters": {"methods": "gradcam"}}
    assert fresh.post("/v2/models/demo-cxr/infer", json=infer).status_code == 200
    assert fresh.get("/no/such/path").status_code == 404
    samples = _samples(fresh)

    def requests(**labels: str) -> float:
        return samples[("medexplain_http_requests_total", tuple(sorted(labels.items())))]

    assert requests(method="POST", handler="/predict", code="200", model="demo-cxr") == 2
    assert requests(method="POST", handler="/predict", code="404", model="") == 1
    assert requests(method="GET", handler="/v2/models/{name}", code="200",
                    model="demo-cxr") == 1
    assert requests(method="other", handler="unmatched", code="404", model="") == 1
    assert samples[("medexplain_http_request_duration_seconds_count",
                    (("code", "200"), ("handler", "/predict"), ("method", "POST"),
                     ("model", "demo-cxr")))] == 2
    assert samples[("medexplain_method_duration_seconds_count",
                    (("method", "gradcam"), ("model", "demo-cxr")))] == 1
    assert not any("made-up" in value for (_, labels) in samples for _, value in labels)


def test_process_and_build_info(fresh: TestClient) -> None:
    samples = _samples(fresh)
    names = {name for name, _ in samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes",
            "process_open_fds", "process_start_time_seconds"} <= names
    assert samples[("process_resident_memory_bytes", ())] > 10e6
    assert samples[("medexplain_build_info", (
        ("onnxruntime_version", onnxruntime.__version__),
        ("python_version", platform.python_version()),
        ("version", __version__)))] == 1
    text = fresh.get("/metrics").text
    # Each family once: a scrape with a family twice is refused.
    types = re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE)
    assert len(types) == len(set(types)), sorted(t for t in types if types.count(t) > 1)
    assert re.search(r"^# TYPE medexplain_http_requests_total counter$", text, re.MULTILINE)
    assert re.search(r"^# TYPE medexplain_http_request_duration_seconds histogram$", text,
                     re.MULTILINE)


def test_answers_before_routing_name_their_fixed_path() -> None:
    # A protected /metrics or /docs answers 401 before routing, and a mount's static files
    # leave no route in the scope: both were counted as handler="unmatched".
    key = "k" * 16
    settings = Settings(models=MODELS, threads=1, api_keys=(key,), protect_metrics=True,
                        protect_docs=True)
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/docs").status_code == 401
        assert client.get("/static/app.js").status_code == 200
        assert client.get("/docs/assets/favicon.png").status_code == 200
        assert client.get("/static/../../etc/passwd").status_code == 404
        samples = _samples(client, {"x-api-key": key})

    def requests(**labels: str) -> float:
        return samples.get(("medexplain_http_requests_total", tuple(sorted(labels.items()))),
                           0.0)

    assert requests(method="GET", handler="/metrics", code="401", model="") == 1
    assert requests(method="GET", handler="/docs", code="401", model="") == 1
    assert requests(method="GET", handler="/static", code="200", model="") == 1
    assert requests(method="GET", handler="/docs/assets", code="200", model="") == 1
    handlers = {dict(labels)["handler"] for name, labels in samples
                if name == "medexplain_http_requests_total"}
    assert handlers <= {"/metrics", "/docs", "/static", "/docs/assets", "unmatched"}, handlers
