"""The committed OpenAPI document, fuzzed by schemathesis against the app: generated
parameters with real images (PNG, JPEG, DICOM phantoms) in the bodies. Every answer must be
described by the document (status, content type, headers, schema) and none may be a 5xx;
a request the document allows must be accepted (positive_data_acceptance) and one it does
not allow refused (negative_data_rejection), so the document states what the server
enforces."""

from __future__ import annotations

import base64
import json
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
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.config import Settings
from service.main import create_app
from tests.api.conftest import DATA, MODELS, ROOT, small_phantom_png

# Cases per operation and generation mode, about 530 in all (≥ 500 asked); operations
# without parameters get one positive case. The upload routes compute on the demo model,
# hence small phantoms; refused cases cost little.
EXAMPLES = {"POST /explain": (50, 30), "POST /explain/dicom": (20, 16),
            "POST /predict": (60, 30), "GET /models": (20, 0), "GET /models/{name}": (20, 20),
            "POST /v1/models/{name}:explain": (20, 12),
            "POST /v1/models/{name}:predict": (24, 12),
            "POST /v2/models/{name}/infer": (30, 16),
            "POST /v2/models/{name}/versions/{version}/infer": (12, 12)}
OTHERS = (10, 10)

# Refusals of a request the document allows, each with a code of its own, because it depends
# on run-time state or ties values together in a way no OpenAPI schema can state:
# (status, problem code) -> why. Any other refusal of valid data fails the test.
RUN_TIME_REFUSALS = {
    (404, "unknown_model"): "a model name is any string; which ones are served is the "
                            "deployment's (GET /models)",
    (422, "unknown_label"): "classes are the chosen model's labels (GET /models/{name})",
    (422, "frame_out_of_range"): "how many frames there are is the uploaded image's",
    (422, "repeated_parameter"): "OpenAPI cannot say that a query parameter and a form "
                                 "field of the same name exclude each other",
    (422, "incompatible_parameters"): "OpenAPI parameters are independent: it cannot say "
                                      "that size=feature excludes the input-grid methods",
    (400, "tensor_mismatch"): "an FP32 tensor's shape is the model's network input (GET "
                              "/v2/models/{name}), and JSON Schema cannot tie the data's "
                              "length to the shape's product",
    (400, "output_not_computed"): "a map output must be named in the methods parameter, a "
                                  "comma list in a string: no schema relates the two",
}


def _code(response: Any) -> str | None:
    if not response.headers.get("content-type", [""])[0].startswith("application/problem"):
        return None
    code = response.json().get("code")
    return code if isinstance(code, str) else None


def positive_data_acceptance_but_run_time(ctx: Any, response: Any, case: Any) -> bool | None:
    """positive_data_acceptance (strict: 200 only), except the run-time refusals."""
    if (response.status_code, _code(response)) in RUN_TIME_REFUSALS:
        return None
    return positive_data_acceptance(ctx, response, case)  # type: ignore[no-any-return]


# No 5xx, every answer as the document describes it, a request without a key refused, valid
# data accepted and invalid data refused.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, ignored_auth,
          positive_data_acceptance_but_run_time, negative_data_rejection]


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
# The multipart 'file' part's encoding names its media types, so it takes those strategies;
# other binary strings carry one of the real images too, and base64 strings (KServe V1's
# b64) one of them encoded.
schemathesis.openapi.format("binary", st.sampled_from(list(IMAGES.values())))
# An Open Inference Protocol V2 binary body with no Inference-Header-Content-Length is its
# JSON header alone: an image input, base64.
schemathesis.openapi.media_type("application/octet-stream", st.sampled_from([json.dumps(
    {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                 "data": [base64.b64encode(image).decode()]}]}).encode()
    for image in IMAGES.values()]))
schemathesis.openapi.format("byte", st.sampled_from(
    [base64.b64encode(image).decode() for image in IMAGES.values()]))

# Valid data gets 200: every other status is a refusal positive_data_acceptance reports,
# but for RUN_TIME_REFUSALS.
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"positive_data_acceptance": {"expected-statuses": ["200"]}}})
SCHEMA = schemathesis.openapi.from_path(ROOT / "openapi" / "openapi.json", config=CONFIG)

# Keys configured: the document declares the API-key schemes, and schemathesis checks that a
# request without one is refused.
KEY = "schemathesis-test-key-0123456789"
# Path parameters that name what is served, for half of the cases of an operation with them
# (the other half draws names: 404 unknown_model).
SERVED = {"name": "demo-cxr", "version": "1"}


@pytest.fixture(scope="module")
def app() -> Iterator[FastAPI]:
    application = create_app(Settings(models=MODELS, threads=1, api_keys=(KEY,)))
    with TestClient(application):  # the lifespan: models loaded once for every case
        SCHEMA.app = application  # the committed document, sent to this app in-process
        yield application


def _fuzz(operation: Any, mode: GenerationMode, examples: int, path: dict[str, str],
          seen: dict[tuple[str, str, int], int], label: str) -> None:
    """``examples`` generated cases of one operation, each sent and checked."""

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path))
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(base_url="http://testserver",
                                          headers={"X-API-Key": KEY}, checks=CHECKS)
        key = (label, mode.value, response.status_code)
        seen[key] = seen.get(key, 0) + 1

    check()


def test_every_answer_matches_the_document(app: FastAPI) -> None:
    seen: dict[tuple[str, str, int], int] = {}
    for result in SCHEMA.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        names = {p.name for p in operation.path_parameters}
        served = {k: v for k, v in SERVED.items() if k in names}
        has_input = bool(list(operation.iter_parameters())) or bool(operation.body)
        positive, negative = EXAMPLES.get(label, OTHERS) if has_input else (1, 0)
        for mode, count in ((GenerationMode.POSITIVE, positive),
                            (GenerationMode.NEGATIVE, negative)):
            halves = [(count - count // 2, served), (count // 2, {})] if served else [
                (count, {})]
            for examples, path in halves:
                if examples:
                    _fuzz(operation, mode, examples, path, seen, label)
    total = sum(seen.values())
    assert total >= 500, seen
    assert not any(status >= 500 for _, _, status in seen), seen
    # The images are real: valid requests got through to a 200 on every upload route, and
    # invalid ones were refused there with a 4xx.
    for label in ("POST /explain", "POST /explain/dicom", "POST /predict",
                  "POST /v1/models/{name}:explain", "POST /v1/models/{name}:predict",
                  "POST /v2/models/{name}/infer"):
        assert seen.get((label, "positive", 200), 0) > 0, (label, seen)
        assert any(n for (at, mode, status), n in seen.items()
                   if at == label and mode == "negative" and 400 <= status < 500), (label, seen)
