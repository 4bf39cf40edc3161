"""Every client mistake gets a problem+json 4xx with a stable code, never a 500."""

from __future__ import annotations

import tempfile

import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from service.config import Settings
from service.main import create_app
from tests.api.conftest import DATA, MODELS, assert_problem, phantom_bytes

PNG = "normal.png"


def _png() -> bytes:
    return phantom_bytes(PNG)


def _dicom() -> bytes:
    return (DATA / "dicom" / "phantom_nodule.dcm").read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ({"content": b"GIF89a....", "headers": {"content-type": "image/gif"}}, 415,
         "unsupported_media_type"),
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty_body"),
        ({"content": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "headers": {"content-type": "image/png"}},
         400, "invalid_image"),
        ({"content": b"\xff\xd8\xff\xe0garbage", "headers": {"content-type": "image/jpeg"}}, 400,
         "invalid_image"),
        ({"files": {"other": ("a.png", b"x", "image/png")}}, 400, "invalid_multipart"),
        ({"files": {"file": ("a.png", b"", "image/png")}}, 400, "empty_body"),
        ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400,
         "invalid_multipart"),
    ],
    ids=["text", "gif", "empty", "corrupt-png", "corrupt-jpeg", "no-file-part", "empty-file",
         "no-boundary"],
)
def test_bad_bodies(client: TestClient, kwargs: dict, status: int, code: str) -> None:  # type: ignore[type-arg]
    for path in ("/explain", "/predict"):
        assert_problem(client.post(path, **kwargs), status, code)


@pytest.mark.parametrize("cut", [10, 200, 600, 2000, -100])
def test_truncated_dicom(client: TestClient, cut: int) -> None:
    data = _dicom()[:cut]
    r = client.post("/explain", content=data, headers={"content-type": "application/dicom"})
    assert_problem(r, 400, "invalid_dicom")


@pytest.mark.parametrize("name", ["rtplan.dcm", "DICOMDIR"])
def test_dicom_without_pixels(client: TestClient, name: str) -> None:
    path = get_testdata_file(name, download=False)
    assert path is not None
    with open(path, "rb") as f:
        r = client.post("/explain", content=f.read(), headers={"content-type": "application/dicom"})
    assert_problem(r, 415, "dicom_without_pixels")


def _file_part(data: bytes) -> bytes:
    return (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + data + b"\r\n")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        # Cut before the closing boundary: the parser alone would hand on what it has.
        (lambda png: _file_part(png)[:-2], "ends before its closing boundary"),
        # Several files: which one was meant is unknowable, so none is chosen.
        (lambda png: _file_part(png) * 3 + b"--xyz--\r\n", "more than one 'file' part"),
    ],
    ids=["no-closing-boundary", "three-file-parts"],
)
def test_ambiguous_multipart(client: TestClient, body, match: str) -> None:  # type: ignore[no-untyped-def]
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    whole = _file_part(_png()) + b"--xyz--\r\n"
    for path in ("/explain", "/predict"):
        assert client.post(path, content=whole, headers=headers).status_code == 200
        r = client.post(path, content=body(_png()), headers=headers)
        assert_problem(r, 400, "invalid_multipart")
        assert match in r.json()["detail"]


@pytest.mark.parametrize(
    ("params", "status", "code", "match"),
    [
        ({"model": "nope"}, 404, "unknown_model", "no model named 'nope'; available: demo-cxr"),
        ({"classes": "Fracture"}, 422, "unknown_label", "unknown class 'Fracture'"),
        ({"classes": "7"}, 422, "unknown_label", "indices 0..3"),
        ({"methods": "gradcam,lime"}, 422, "unknown_method", "unknown method 'lime'"),
        ({"heatmap": "gif"}, 422, "invalid_parameter", "heatmap='gif' is not one of"),
        ({"size": "huge"}, 422, "invalid_parameter", "size='huge'"),
        ({"target": "loss"}, 422, "invalid_parameter", "target='loss'"),
        ({"region_threshold": "2"}, 422, "invalid_parameter", "between 0.0 and 1.0"),
        ({"score_threshold": "abc"}, 422, "invalid_parameter", "not a number"),
        ({"frame": "-1"}, 422, "invalid_parameter", "integer from 0 to"),
        ({"frame": "\u00b2"}, 422, "invalid_parameter", "integer from 0 to"),
        ({"frame": "9" * 5000}, 422, "invalid_parameter", "integer from 0 to"),
        ({"classes": "\u00b2"}, 422, "unknown_label", "unknown class"),
        ({"window": "40"}, 422, "invalid_parameter", "center,width"),
        ({"mehtods": "crm"}, 422, "invalid_parameter", "unknown parameter"),
        # Valid as the document states the parameters; refused for what the image holds or
        # for the two together, each with its own code.
        ({"frame": "1"}, 422, "frame_out_of_range", "PNG and JPEG have 1 frame"),
        ({"methods": "guided_backprop", "size": "feature"}, 422, "incompatible_parameters",
         "size=feature is only for CAM-type maps"),
        # As sent: lower case, and empty only where the document allows it.
        ({"heatmap": "NPY"}, 422, "invalid_parameter", "heatmap='NPY' is not one of"),
        ({"methods": "GradCAM"}, 422, "unknown_method", "unknown method 'GradCAM'"),
        ({"target": ""}, 422, "invalid_parameter", "target='' is not one of"),
    ],
)
def test_bad_parameters(client: TestClient, params: dict[str, str], status: int, code: str,
                        match: str) -> None:
    r = client.post("/explain", content=_png(), params=params,
                    headers={"content-type": "image/png"})
    body = assert_problem(r, status, code)
    assert match in str(body["detail"])
    # The same parameters as multipart form fields give the same answer.
    r = client.post("/explain", files={"file": ("a.png", _png(), "image/png")}, data=params)
    assert assert_problem(r, status, code)["detail"] == body["detail"]


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_problem(client.get("/nope"), 404, "not_found")
    assert_problem(client.get("/explain"), 405, "method_not_allowed")
    assert_problem(client.get("/models/nope"), 404, "unknown_model")


def test_upload_over_the_limit() -> None:
    settings = Settings(models=MODELS, max_upload_bytes=4096, threads=1)
    with TestClient(create_app(settings)) as small:
        r = small.post("/explain", content=b"\0" * 5000, headers={"content-type": "image/png"})
        assert_problem(r, 413, "payload_too_large")
        r = small.post("/explain", files={"file": ("a.png", b"\0" * 5000, "image/png")})
        assert_problem(r, 413, "payload_too_large")


def test_pixel_count_limit() -> None:
    settings = Settings(models=MODELS, max_pixels=100 * 100, threads=1)
    with TestClient(create_app(settings)) as small:
        r = small.post("/explain", content=_png(), headers={"content-type": "image/png"})
        assert_problem(r, 413, "payload_too_large")


def test_api_keys() -> None:
    key = "k" * 20
    settings = Settings(models=MODELS, api_keys=(key,), threads=1)
    with TestClient(create_app(settings)) as locked:
        assert_problem(locked.get("/models"), 401, "unauthorized")
        r = locked.post("/predict", content=_png(), headers={"content-type": "image/png",
                                                             "x-api-key": "wrong" * 4})
        assert_problem(r, 401, "unauthorized")
        assert locked.get("/models", headers={"x-api-key": key}).status_code == 200
        r = locked.post("/predict", content=_png(), headers={"content-type": "image/png",
                                                             "authorization": f"Bearer {key}"})
        assert r.status_code == 200
        assert locked.get("/healthz").status_code == 200  # probes need no key


def test_overload_gives_503_with_retry_after() -> None:
    settings = Settings(models=MODELS, max_concurrency=1, max_queue=0, threads=1)
    with TestClient(create_app(settings)) as c:
        limiter = c.app_state["limiter"]
        limiter.pending = 1  # one request computing, none may wait
        r = c.post("/predict", content=_png(), headers={"content-type": "image/png"})
        assert_problem(r, 503, "overloaded")
        assert r.headers["retry-after"] == "1"
        assert c.get("/readyz").status_code == 503
        limiter.pending = 0
        assert c.post("/predict", content=_png(),
                      headers={"content-type": "image/png"}).status_code == 200
        assert c.get("/readyz").json() == {"status": "ready"}


def test_uploads_never_touch_the_disk(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an upload was spooled to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    big = _png() + b"\0" * (2 * 1024 * 1024)  # past Starlette's 1 MB spool threshold
    r = client.post("/predict", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 200, r.text
