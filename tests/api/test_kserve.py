"""KServe V1 verbs over plain HTTP (httpx) against ``medexplain serve`` on loopback: the
instances body TF-Serving and KServe image models take; each instance's answer is what
/predict or /explain answers for the image."""

from __future__ import annotations

import base64
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.data import get_testdata_file

from tests.api.conftest import ROOT
from tests.api.live import live_server

PHANTOMS = ROOT / "tests" / "data" / "phantoms"
DICOM = ROOT / "tests" / "data" / "dicom" / "phantom_nodule.dcm"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server(max_instances="3") as live:
        yield f"http://127.0.0.1:{live.port}"


def _without_timings(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "timings_ms"}


def test_models_and_readiness(server: str) -> None:
    assert httpx.get(f"{server}/v1/models").json() == {"models": ["demo-cxr"]}
    assert httpx.get(f"{server}/v1/models/demo-cxr").json() == {"name": "demo-cxr",
                                                                 "ready": True}
    missing = httpx.get(f"{server}/v1/models/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["error"] == "no model named 'nope'; available: demo-cxr"


def test_predict_equals_predict(server: str) -> None:
    images = [(PHANTOMS / "nodule.png").read_bytes(), DICOM.read_bytes()]
    answer = httpx.post(f"{server}/v1/models/demo-cxr:predict", timeout=60, json={
        "instances": [{"image_bytes": {"b64": _b64(images[0])}}, {"b64": _b64(images[1])}]})
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert len(predictions) == 2
    for data, prediction in zip(images, predictions, strict=True):
        direct = httpx.post(f"{server}/predict", content=data, timeout=60).json()
        assert _without_timings(prediction) == _without_timings(direct)


def test_explain_equals_explain(server: str) -> None:
    data = (PHANTOMS / "nodule_pneumothorax.png").read_bytes()
    params = {"methods": "gradcam,crm", "classes": "Nodule", "heatmap": "npy"}
    answer = httpx.post(f"{server}/v1/models/demo-cxr:explain", params=params, timeout=60,
                        json={"instances": [{"image_bytes": {"b64": _b64(data)}}]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    direct = httpx.post(f"{server}/explain", content=data, params=params, timeout=60).json()
    assert [_without_timings(e) for e in body["explanations"]] == [_without_timings(direct)]
    predicted = httpx.post(f"{server}/predict", content=data, timeout=60).json()
    assert [_without_timings(p) for p in body["predictions"]] == [_without_timings(predicted)]


@pytest.mark.parametrize(("body", "params", "status", "message"), [
    (b"not json", {}, 400, "the body is not"),
    (json.dumps({"instances": []}).encode(), {}, 400, "instances is empty"),
    (json.dumps({"instances": [{"b64": "!!!"}]}).encode(), {}, 400,
     r"instances\[0\] is not valid base64"),
    # A non-ASCII string is no base64: a ValueError, not binascii.Error (once a 500).
    (json.dumps({"instances": [{"b64": "\u00e9"}]}).encode(), {}, 400,
     r"instances\[0\] is not valid base64"),
    # Exactly one member, not null, as the document's oneOf states it.
    (json.dumps({"instances": [{"image_bytes": None}]}).encode(), {}, 400,
     r"instances\[0\] holds one image"),
    (json.dumps({"instances": [{"b64": "aGVsbG8=", "image_bytes": None}]}).encode(), {}, 400,
     r"instances\[0\] holds one image"),
    (json.dumps({"instances": [{"b64": "aGVsbG8="}] * 4}).encode(), {}, 400,
     "4 instances; the limit is 3"),
    (json.dumps({"instances": [{"b64": "aA=="}] * 10_000}).encode(), {}, 400,
     "more than 3 instances; the limit is that per request"),
    (json.dumps({"instances": [{"b64": "aGVsbG8="}]}).encode(), {}, 415,
     "the bytes are not PNG, JPEG or DICOM"),
    (json.dumps({"instances": [{"b64": "aGVsbG8="}]}).encode(), {"model": "x"}, 422,
     "parameter 'model' does not apply here"),
    (json.dumps({"instances": [{"b64": "aGVsbG8="}]}).encode(), {"methods": "nope"}, 422,
     "unknown method 'nope'"),
    # Found on the compute stream, for each of the two instances: one answer, the error.
    (json.dumps({"instances": [{"b64": _b64((PHANTOMS / "nodule.png").read_bytes())}] * 2}
                ).encode(), {"classes": "Fracture"}, 422, "unknown class 'Fracture'"),
], ids=["not-json", "empty", "bad-base64", "non-ascii-base64", "null-member", "two-members",
        "too-many", "flood", "not-an-image", "model-param",
        "unknown-method", "unknown-class"])
def test_bad_requests(server: str, body: bytes, params: dict[str, str], status: int,
                      message: str) -> None:
    answer = httpx.post(f"{server}/v1/models/demo-cxr:explain", content=body, params=params,
                        headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["status"] == status
    assert problem["error"] == problem["detail"]
    assert re.search(message, problem["detail"]), problem["detail"]


def test_a_dicom_the_model_is_not_for_is_refused(server: str) -> None:
    ct = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    answer = httpx.post(f"{server}/v1/models/demo-cxr:predict", timeout=60,
                        json={"instances": [{"b64": _b64(ct)}]})
    assert answer.status_code == 422, answer.text
    assert answer.json()["code"] == "dicom_not_accepted"
    assert answer.json()["error"].startswith("model demo-cxr is not for this image: Modality")


def test_the_served_document_states_the_instance_limit(server: str) -> None:
    """The limit is a setting: the document this server serves states its value."""
    spec = httpx.get(f"{server}/openapi.json").json()
    instances = spec["components"]["schemas"]["V1Request"]["properties"]["instances"]
    assert (instances["minItems"], instances["maxItems"]) == (1, 3)
    too_many = {"instances": [{"b64": "aGVsbG8="}] * 4}
    assert httpx.post(f"{server}/v1/models/demo-cxr:predict", json=too_many).status_code == 400


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_body_is_inflated(server: str, encoding: str) -> None:
    """As on the V2 routes. The instance count is read after inflating: the compressed
    bytes' commas once made one gzip instance "more than 3 instances"."""
    data = (PHANTOMS / "nodule.png").read_bytes()
    body = json.dumps({"instances": [{"b64": _b64(data)}]}).encode()
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}[encoding]
    packer = zlib.compressobj(wbits=wbits)
    packed = packer.compress(body) + packer.flush()
    answer = httpx.post(f"{server}/v1/models/demo-cxr:predict", content=packed, timeout=60,
                        headers={"content-encoding": encoding,
                                 "content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    direct = httpx.post(f"{server}/predict", content=data, timeout=60).json()
    assert _without_timings(answer.json()["predictions"][0]) == _without_timings(direct)
    refused = httpx.post(f"{server}/v1/models/demo-cxr:predict", content=body, timeout=60,
                         headers={"content-encoding": "br"})
    assert (refused.status_code, refused.json()["error"]) == (
        415, "Content-Encoding 'br' is not gzip or deflate")
