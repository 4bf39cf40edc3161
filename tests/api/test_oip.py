"""The Open Inference Protocol V2 spoken by the real ``tritonclient[http]`` client to
``medexplain serve`` on loopback: health, metadata, and infer with an encoded image
(BYTES) and with a preprocessed tensor (FP32), in binary and JSON form; the answers equal
what /predict and /explain answer for the same image."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from tritonclient.utils import InferenceServerException

from service.config import Settings
from service.main import create_app
from tests.api.conftest import ROOT
from tests.api.live import live_server

PHANTOMS = ROOT / "tests" / "data" / "phantoms"
DICOM = ROOT / "tests" / "data" / "dicom" / "phantom_nodule.dcm"
MODEL = "demo-cxr"
LABELS = ["Cardiomegaly", "Nodule", "Pleural Effusion", "Pneumothorax"]
# model.toml of demo-cxr.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server() as live:
        yield f"http://127.0.0.1:{live.port}"


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=server.removeprefix("http://"))
    yield c
    c.close()


def _predict(server: str, data: bytes) -> np.ndarray:
    answer = httpx.post(f"{server}/predict", content=data, timeout=60)
    assert answer.status_code == 200, answer.text
    return np.array([p["score"] for p in answer.json()["predictions"]], dtype=np.float32)


def _explain_maps(server: str, data: bytes, methods: str,
                  classes: str) -> dict[str, tuple[list[int | None], np.ndarray]]:
    """/explain's raw float32 maps (heatmap=npy) on the model grid, by method."""
    answer = httpx.post(f"{server}/explain", content=data, timeout=60,
                        params={"methods": methods, "classes": classes, "heatmap": "npy"})
    assert answer.status_code == 200, answer.text
    out: dict[str, tuple[list[int | None], list[np.ndarray]]] = {}
    for item in answer.json()["explanations"]:
        indices, maps = out.setdefault(item["method"], ([], []))
        indices.append(item["index"])
        maps.append(np.load(io.BytesIO(base64.b64decode(item["heatmap"]["data"]))))
    return {m: (i, np.stack(v)) for m, (i, v) in out.items()}


def test_server_and_model_health(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata() == {"name": "medexplain", "version": "0.1.0",
                                            "extensions": ["binary_tensor_data"]}
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("no-such-model")


def test_model_version_in_the_path(client: triton.InferenceServerClient,
                                   server: str) -> None:
    assert client.is_model_ready(MODEL, model_version="1")
    assert not client.is_model_ready(MODEL, model_version="2")
    assert client.get_model_metadata(MODEL, model_version="1") == client.get_model_metadata(
        MODEL)
    with pytest.raises(InferenceServerException,
                       match="model 'demo-cxr' has version '1', not '2'"):
        client.get_model_metadata(MODEL, model_version="2")
    data = (PHANTOMS / "nodule.png").read_bytes()
    image = _input("image", [1], "BYTES", np.array([data], dtype=np.object_))
    result = client.infer(MODEL, [image], model_version="1")
    np.testing.assert_array_equal(result.as_numpy("scores")[0], _predict(server, data))
    assert result.get_response()["model_version"] == "1"


def test_model_metadata(client: triton.InferenceServerClient) -> None:
    metadata = client.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [1]},
        {"name": "tensor", "datatype": "FP32", "shape": [1, 3, 256, 256]},
    ]
    assert metadata["outputs"][0] == {"name": "scores", "datatype": "FP32", "shape": [1, 4]}
    assert {o["name"] for o in metadata["outputs"][1:]} >= {"gradcam", "crm", "crm_combined"}
    assert metadata["labels"] == LABELS
    with pytest.raises(InferenceServerException, match="no model named 'no-such-model'"):
        client.get_model_metadata("no-such-model")


@pytest.mark.parametrize("path", [PHANTOMS / "nodule_pneumothorax.png", DICOM],
                         ids=["png", "dicom"])
def test_infer_bytes_equals_predict_and_explain(client: triton.InferenceServerClient,
                                                server: str, path: Path) -> None:
    data = path.read_bytes()
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([data], dtype=np.object_))  # binary by default
    result = client.infer(MODEL, [image], parameters={"methods": "gradcam,crm",
                                                      "classes": "Nodule,Pneumothorax"})
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32 and scores.shape == (1, 4)
    np.testing.assert_array_equal(scores[0], _predict(server, data))
    expected = _explain_maps(server, data, "gradcam,crm", "Nodule,Pneumothorax")
    for method in ("gradcam", "crm"):
        output = result.get_output(method)
        assert output["parameters"]["classes"] == "1,3"
        assert output["parameters"]["labels"] == "Nodule,Pneumothorax"
        indices, maps = expected[method]
        assert indices == [1, 3]
        np.testing.assert_allclose(result.as_numpy(method)[0], maps, rtol=1e-6, atol=0)


def test_infer_bytes_as_json(client: triton.InferenceServerClient, server: str) -> None:
    """JSON tensors: image bytes are no UTF-8 text, so the element is their base64."""
    data = (PHANTOMS / "cardiomegaly.png").read_bytes()
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([base64.b64encode(data)], dtype=np.object_),
                              binary_data=False)
    outputs = [triton.InferRequestedOutput("scores", binary_data=False),
               triton.InferRequestedOutput("crm_combined", binary_data=False)]
    result = client.infer(MODEL, [image], outputs=outputs,
                          parameters={"methods": "crm_combined"})
    np.testing.assert_array_equal(result.as_numpy("scores")[0], _predict(server, data))
    assert result.get_output("crm_combined")["parameters"]["classes"] == ""
    _, maps = _explain_maps(server, data, "crm_combined", "")["crm_combined"]
    np.testing.assert_allclose(result.as_numpy("crm_combined")[0], maps, rtol=1e-6, atol=0)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["scores", "crm_combined"]


def test_no_outputs_requested_is_every_output(server: str) -> None:
    """"outputs": [] requests none in particular: every output, as when it is absent
    (it answered none)."""
    body = {"inputs": [_image()], "parameters": {"methods": "gradcam"}}
    answers = [httpx.post(f"{server}/v2/models/{MODEL}/infer", json=b, timeout=120).json()
               for b in (body, {**body, "outputs": []})]
    assert [o["name"] for o in answers[0]["outputs"]] == ["scores", "gradcam"]
    assert answers[1]["outputs"] == answers[0]["outputs"]


def _network_input(path: Path) -> np.ndarray:
    """demo-cxr's input for a 256 x 256 grey PNG, by hand: 0..1, replicated to 3 channels,
    (x - mean) / std, NCHW."""
    grey = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.float32) / 255
    assert grey.shape == (256, 256)
    planes = (grey[None] - MEAN[:, None, None]) / STD[:, None, None]
    return planes[None].astype(np.float32)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_fp32_tensor(client: triton.InferenceServerClient, server: str,
                           binary: bool) -> None:
    path = PHANTOMS / "nodule.png"
    tensor = triton.InferInput("tensor", [1, 3, 256, 256], "FP32")
    tensor.set_data_from_numpy(_network_input(path), binary_data=binary)
    result = client.infer(MODEL, [tensor], parameters={"methods": "gradcam",
                                                       "classes": "Nodule"})
    # The preprocessing written out above is the service's, float32 operation for
    # operation, so the network sees the same numbers as for the PNG itself.
    np.testing.assert_array_equal(result.as_numpy("scores")[0],
                                  _predict(server, path.read_bytes()))
    _, maps = _explain_maps(server, path.read_bytes(), "gradcam", "Nodule")["gradcam"]
    np.testing.assert_allclose(result.as_numpy("gradcam")[0], maps, rtol=1e-6, atol=0)


def test_scores_only_without_methods(client: triton.InferenceServerClient) -> None:
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([(PHANTOMS / "normal.png").read_bytes()],
                                       dtype=np.object_))
    result = client.infer(MODEL, [image])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["scores"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda: _input("pixels", [1], "BYTES", np.array([b"x"], dtype=np.object_)),
     "unknown input 'pixels'"),
    (lambda: _input("image", [1], "FP32", np.zeros(1, dtype=np.float32)),
     "input image is BYTES, not 'FP32'"),
    (lambda: _input("tensor", [1, 3, 128, 128], "FP32",
                    np.zeros((1, 3, 128, 128), dtype=np.float32)),
     r"tensor: shape \[1, 3, 128, 128\] is not the network input's \[1, 3, 256, 256\]"),
    (lambda: _input("image", [1], "BYTES", np.array([b"not an image"], dtype=np.object_)),
     r"\[415\] the bytes are not PNG, JPEG or DICOM"),
], ids=["unknown-input", "wrong-datatype", "wrong-shape", "not-an-image"])
def test_bad_requests_get_the_reason(client: triton.InferenceServerClient, make: object,
                                     message: str) -> None:
    with pytest.raises(InferenceServerException, match=message):
        client.infer(MODEL, [make()])  # type: ignore[operator]
    assert client.is_server_ready()


def test_unknown_parameter_and_output(client: triton.InferenceServerClient) -> None:
    image = _input("image", [1], "BYTES",
                   np.array([(PHANTOMS / "normal.png").read_bytes()], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="unknown parameter 'heatmap'"):
        client.infer(MODEL, [image], parameters={"heatmap": "png"})
    with pytest.raises(InferenceServerException, match="output 'gradcam' is not computed"):
        client.infer(MODEL, [image], outputs=[triton.InferRequestedOutput("gradcam")])
    with pytest.raises(InferenceServerException, match=r"\[422\] unknown class 'Fracture'"):
        client.infer(MODEL, [image], parameters={"methods": "crm", "classes": "Fracture"})


def _input(name: str, shape: list[int], datatype: str, values: np.ndarray) -> triton.InferInput:
    given = triton.InferInput(name, shape, datatype)
    given.set_data_from_numpy(values)
    return given


def test_a_flood_of_json_values_is_refused_before_parsing(server: str) -> None:
    """Parsed, each small JSON value costs ~30 bytes of memory: a body of a million zeros
    is refused from its size in values, not parsed."""
    body = (b'{"inputs":[{"name":"tensor","datatype":"FP32","shape":[1000000],"data":['
            + b"0," * 999_999 + b"0]}]}")
    answer = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=body, timeout=60)
    assert answer.status_code == 400
    assert answer.json()["error"] == ("the JSON header holds more than 403216 values; this "
                                      "model's tensors need fewer")


def test_a_dicom_the_model_is_not_for_is_refused(client: triton.InferenceServerClient) -> None:
    """The model's [accepts] rules hold here as on /explain: a CT is no chest radiograph."""
    ct = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    with pytest.raises(InferenceServerException,
                       match=r"\[422\] model demo-cxr is not for this image: Modality"):
        client.infer(MODEL, [_input("image", [1], "BYTES", np.array([ct], dtype=np.object_))])


def test_api_keys_guard_the_models_not_the_health_probes() -> None:
    key = "k" * 24
    settings = Settings(models=ROOT / "models", threads=1, api_keys=(key,))
    with TestClient(create_app(settings)) as keyed:
        assert keyed.get("/v2/health/live").json() == {"live": True}
        assert keyed.get("/v2/health/ready").json() == {"ready": True}
        refused = keyed.get("/v2/models/demo-cxr")
        assert refused.status_code == 401
        assert refused.json()["error"] == ("this service needs an API key (X-API-Key or "
                                           "Authorization: Bearer)")
        assert keyed.get("/v2/models/demo-cxr", headers={"X-API-Key": key}).status_code == 200
        assert keyed.get("/v1/models", headers={"Authorization": "Bearer x"}).status_code == 401
        assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json() == {
            "models": ["demo-cxr"]}


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client: triton.InferenceServerClient, server: str,
                             algorithm: str) -> None:
    data = (PHANTOMS / "pneumothorax.png").read_bytes()
    image = _input("image", [1], "BYTES", np.array([data], dtype=np.object_))
    result = client.infer(MODEL, [image], request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("scores")[0], _predict(server, data))


def test_a_compression_bomb_stops_at_the_upload_limit(server: str) -> None:
    bomb = gzip.compress(b"0" * (64 * 1024 * 1024 + 1), compresslevel=1)
    assert len(bomb) < 1024 * 1024
    answer = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=bomb, timeout=60,
                        headers={"content-encoding": "gzip"})
    assert answer.status_code == 413
    assert answer.json()["error"] == ("the body inflates to more than the limit of "
                                      "67108864 bytes")
    for encoding, status in (("br", 415), ("gzip", 400)):
        refused = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=b"{}", timeout=60,
                             headers={"content-encoding": encoding})
        assert refused.status_code == status, refused.text


_PNG_B64 = base64.b64encode((PHANTOMS / "normal.png").read_bytes()).decode()


def _image(**changes: object) -> dict[str, object]:
    return {"name": "image", "datatype": "BYTES", "shape": [1], "data": [_PNG_B64], **changes}


@pytest.mark.parametrize(("body", "status", "code", "detail"), [
    # A non-ASCII string is no base64: a ValueError, not binascii.Error (once a 500).
    ({"inputs": [_image(data=["\u00e9"])]}, 400, "invalid_inference_request",
     "image's data is not valid base64"),
    # Nested data, typed parameters and boolean flags as the document states them.
    ({"inputs": [_image(data=[[_PNG_B64]])]}, 400, "invalid_inference_request",
     "image's data is one base64 string"),
    ({"inputs": [_image(shape=[-1, -1])]}, 400, "invalid_inference_request",
     r"image holds one image: shape \[1\], not \[-1, -1\]"),
    ({"inputs": [_image()], "parameters": {"frame": "0"}}, 422, "invalid_parameter",
     "parameter 'frame' is a JSON integer here"),
    ({"inputs": [_image()], "parameters": {"preview": 1}}, 422, "invalid_parameter",
     "parameter 'preview' is a JSON boolean here"),
    ({"inputs": [_image()], "parameters": {"binary_data_output": "yes"}}, 422,
     "invalid_parameter", "parameter 'binary_data_output' is a JSON boolean"),
    ({"inputs": [_image()], "outputs": [{"name": "scores", "parameters": {"binary_data": 1}}]},
     400, "invalid_inference_request", "output scores's binary_data is a JSON boolean"),
    ({"inputs": [{"name": "tensor", "datatype": "FP32", "shape": [1], "data": [True]}]}, 400,
     "invalid_inference_request", "tensor's data are not a flat list of numbers"),
    ({"inputs": [{"name": "tensor", "datatype": "FP32", "shape": [1], "data": [1e39]}]}, 400,
     "invalid_inference_request", "tensor's data are beyond FP32's range"),
    ({"inputs": [{"name": "tensor", "datatype": "FP32", "shape": [1], "data": [10**400]}]},
     400, "invalid_inference_request", "tensor's data are beyond FP32's range"),
    # What no schema states has codes of its own (schemathesis' run-time refusals).
    ({"inputs": [{"name": "tensor", "datatype": "FP32", "shape": [2], "data": [1.0]}]}, 400,
     "tensor_mismatch", r"tensor has 1 values; shape \[2\] needs 2"),
    ({"inputs": [_image()], "outputs": [{"name": "gradcam"}]}, 400, "output_not_computed",
     "output 'gradcam' is not computed for this request"),
], ids=["non-ascii-base64", "nested-data", "shape", "string-frame", "integer-preview",
        "binary-data-output", "binary-data", "bool-data", "float32-overflow", "big-integer",
        "tensor-mismatch", "output-not-computed"])
def test_json_bodies_are_read_as_the_document_states(server: str, body: dict[str, object],
                                                     status: int, code: str,
                                                     detail: str) -> None:
    answer = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert (answer.status_code, answer.json()["code"]) == (status, code), answer.text
    assert re.search(detail, answer.json()["detail"]), answer.json()["detail"]


def test_typed_parameters(server: str) -> None:
    """JSON numbers and booleans for the typed parameters, 2.0 an integer as in JSON Schema."""
    body = {"inputs": [_image()], "parameters": {"methods": "gradcam", "frame": 0.0,
                                                 "score_threshold": 0, "preview": False}}
    answer = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert [o["name"] for o in answer.json()["outputs"]] == ["scores", "gradcam"]


@pytest.mark.parametrize("length", ["9" * 5000, "0" * 5000 + "5", "\u00b2", "\u00b9", "1e3", "-1"],
                         ids=["5000-digits", "leading-zeros", "superscript-2",
                              "superscript-1", "exponent", "negative"])
def test_a_header_length_that_is_no_byte_count_is_refused(server: str, length: str) -> None:
    """Only ASCII digits, and few (Python's int() refuses 4,300 of them; str.isdigit takes
    "²"): each of these was a 500 without an ``error`` member."""
    answer = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=b'{"inputs":[]}',
                        headers={"Inference-Header-Content-Length": length.encode("latin-1")},
                        timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == ("Inference-Header-Content-Length must be a byte count "
                                      "no larger than the body's 13")


def test_gzip_members_one_after_another_are_one_body(server: str) -> None:
    """A gzip body may be several members (RFC 1952 2.2), as concatenated .gz files are;
    bytes that are no member after the data are refused, not ignored."""
    data = (PHANTOMS / "pneumothorax.png").read_bytes()
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(data).decode()]}]}).encode()
    half = len(body) // 2
    url = f"{server}/v2/models/{MODEL}/infer"
    joined = httpx.post(url, content=gzip.compress(body[:half]) + gzip.compress(body[half:]),
                        headers={"content-encoding": "gzip"}, timeout=60)
    assert joined.status_code == 200, joined.text
    scores = np.array(joined.json()["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_array_equal(scores, _predict(server, data))
    for tail, detail in ((b"junk", "the body is not valid gzip data"),
                         (gzip.compress(b"")[:5], "the gzip body is truncated")):
        refused = httpx.post(url, content=gzip.compress(body) + tail,
                             headers={"content-encoding": "gzip"}, timeout=60)
        assert (refused.status_code, refused.json()["error"]) == (400, detail)
    deflated = zlib.compress(body)
    refused = httpx.post(url, content=deflated + deflated,
                         headers={"content-encoding": "deflate"}, timeout=60)
    assert (refused.status_code, refused.json()["error"]) == (
        400, "the body holds bytes after its deflate data")
    many = gzip.compress(b"") * 64 + gzip.compress(body)
    refused = httpx.post(url, content=many, headers={"content-encoding": "gzip"}, timeout=60)
    assert (refused.status_code, refused.json()["error"]) == (
        400, "the gzip body has more than 64 members")


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", f"/v2/models/{MODEL}/config", 404),
    ("GET", "/v2/repository/index", 404),
    ("POST", f"/v2/models/{MODEL}/versions//infer", 404),
    ("DELETE", f"/v2/models/{MODEL}", 405),
    ("GET", f"/v1/models/{MODEL}/unknown", 404),
    ("PUT", "/v1/models", 405),
], ids=["config", "repository-index", "empty-version", "delete", "v1-unknown", "v1-put"])
def test_unknown_paths_and_methods_of_the_protocols_carry_an_error(
        server: str, method: str, path: str, status: int) -> None:
    """tritonclient reads the message from ``error``: without it, get_model_config raised
    "an exception occurred in the client while decoding the response: 'error'"."""
    answer = httpx.request(method, f"{server}{path}", timeout=60)
    assert answer.status_code == status
    body = answer.json()
    assert body["error"] == body["detail"] == f"{method} {path}: " + (
        "Not Found" if status == 404 else "Method Not Allowed")
    # The service's own paths keep the plain problem.
    assert "error" not in httpx.get(f"{server}/models/nothing", timeout=60).json()


def test_get_model_config_raises_the_reason(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException,
                       match=rf"\[404\] GET /v2/models/{MODEL}/config: Not Found"):
        client.get_model_config(MODEL)


@pytest.mark.parametrize(("body", "detail"), [
    ({"inputs": [_image()],
      "outputs": [{"name": "scores", "parameters": {"classification": 2}}]},
     ("output scores: the classification extension is not served; scores holds every "
      "label's score, and the model metadata its labels")),
    ({"inputs": [_image()], "outputs": [{"name": "scores"}, {"name": "scores"}]},
     "output scores is asked for twice"),
    ({"inputs": [_image(parameters={"binary_data_size": 4})]},
     "input image has both data and parameters.binary_data_size: give one"),
    ({"inputs": [_image(data=None, parameters={"binary_data_size": "4"})]},
     "input image's binary_data_size is a JSON integer"),
], ids=["classification", "output-twice", "data-and-binary", "string-size"])
def test_what_the_answer_cannot_honour_is_refused(server: str, body: dict[str, object],
                                                  detail: str) -> None:
    answer = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert (answer.status_code, answer.json()["error"]) == (400, detail), answer.text


def test_json_outputs_are_bounded_binary_ones_not(server: str) -> None:
    """A 1500² image's map at size=original is 2.25 M values: ~135 MB while written as JSON.
    Refused as JSON (pointing at binary data), answered as binary data."""
    big = cv2.resize(cv2.imread(str(PHANTOMS / "nodule.png"), cv2.IMREAD_GRAYSCALE),
                     (1500, 1500), interpolation=cv2.INTER_LINEAR)
    ok, png = cv2.imencode(".png", big)
    assert ok
    image = _image(data=[base64.b64encode(png.tobytes()).decode()])
    url = f"{server}/v2/models/{MODEL}/infer"
    params = {"methods": "gradcam", "classes": "Nodule", "size": "original"}
    refused = httpx.post(url, json={"inputs": [image], "parameters": params}, timeout=120)
    assert refused.status_code == 400
    assert refused.json()["error"].startswith(
        "the outputs asked for as JSON hold 2250004 values, more than the 2097152 a JSON "
        "answer may: ask for them as binary data")
    answer = httpx.post(url, json={"inputs": [image], "parameters": {
        **params, "binary_data_output": True}}, timeout=120)
    assert answer.status_code == 200, answer.text
    size = int(answer.headers["Inference-Header-Content-Length"])
    header = json.loads(answer.content[:size])
    assert [o["shape"] for o in header["outputs"]] == [[1, 4], [1, 1, 1500, 1500]]
    assert len(answer.content) == size + 4 * (4 + 1500 * 1500)
