"""The committed OpenAPI document, fuzzed by schemathesis against the app: generated
parameters with real images (PNG, JPEG, DICOM phantoms) in the bodies. Every answer must be
described by the document (status, content type, headers, schema) and none may be a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.config import Settings
from service.main import create_app
from tests.api.conftest import DATA, MODELS, ROOT, small_phantom_png

# Cases per operation, about 530 in all (≥ 500 asked); operations without parameters get
# one. The upload routes compute on the demo model, hence small phantoms.
EXAMPLES = {"POST /explain": 150, "POST /predict": 200, "GET /models": 90,
            "GET /models/{name}": 90}

# No 5xx, and every answer as the document describes it; a request without a key refused.
# Not positive_data_acceptance / negative_data_rejection: they test whether the document
# states every constraint the server applies (a class name must be a label, ...), which
# it does not try to.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, ignored_auth]


def _small_png() -> bytes:
    """The normal phantom at 64×64: decoding is cheap, the network still sees it whole."""
    return small_phantom_png("normal.png")


def _small_jpeg() -> bytes:
    ok, jpeg = cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(_small_png(), np.uint8),
                                                 cv2.IMREAD_GRAYSCALE))
    assert ok
    return jpeg.tobytes()


IMAGES = {
    "image/png": _small_png(),
    "image/jpeg": _small_jpeg(),
    "application/dicom": (DATA / "dicom" / "phantom_nodule.dcm").read_bytes(),
}
for media, data in IMAGES.items():
    schemathesis.openapi.media_type(media, st.just(data))
# The multipart 'file' part (format: binary) carries one of the real images too.
schemathesis.openapi.format("binary", st.sampled_from(list(IMAGES.values())))

SCHEMA = schemathesis.openapi.from_path(ROOT / "openapi" / "openapi.json")


# Keys configured: the document declares the API-key schemes, and schemathesis checks that a
# request without one is refused.
KEY = "schemathesis-test-key-0123456789"


@pytest.fixture(scope="module")
def app() -> Iterator[FastAPI]:
    application = create_app(Settings(models=MODELS, threads=1, api_keys=(KEY,)))
    with TestClient(application):  # the lifespan: models loaded once for every case
        SCHEMA.app = application  # the committed document, sent to this app in-process
        yield application


def _fuzz(operation: Any, examples: int, calls: dict[str, int], label: str,
          statuses: dict[int, int]) -> None:
    """``examples`` generated cases of one operation, each sent and checked."""

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(base_url="http://testserver",
                                          headers={"X-API-Key": KEY}, checks=CHECKS)
        calls[label] += 1
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    check()


def test_every_answer_matches_the_document(app: FastAPI) -> None:
    calls: dict[str, int] = {}
    statuses: dict[int, int] = {}
    for result in SCHEMA.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        calls[label] = 0
        _fuzz(operation, EXAMPLES.get(label, 10), calls, label, statuses)
    total = sum(calls.values())
    assert total >= 500, calls
    assert not any(status >= 500 for status in statuses), statuses
    # The images are real: some cases got through to a 200 on the upload routes.
    assert calls["POST /predict"] > 0 and statuses.get(200, 0) > 0, statuses
