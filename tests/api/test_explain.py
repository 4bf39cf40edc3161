"""/explain and /predict over HTTP, with values checked against in-process references."""

from __future__ import annotations

import base64
import gzip
import io
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from service.imaging import decode
from service.imaging.preprocess import to_model_input
from service.models.repository import load_model
from tests.api.conftest import DATA, MODELS, phantom_bytes
from tests.imaging.exif import DISPLAYED, orientation_tiff, png_with_exif
from tests.outputs import reference as drawing

LABELS = ["Cardiomegaly", "Nodule", "Pleural Effusion", "Pneumothorax"]


def _png(data: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_UNCHANGED)


def _npy(data: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(data)), allow_pickle=False)


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    return load_model(MODELS / "demo-cxr", providers=["CPUExecutionProvider"], threads=1,
                      head_batch=256)


def test_multipart_png_gives_scores_and_heatmaps(client: TestClient, phantoms) -> None:  # type: ignore[no-untyped-def]
    item = next(p for p in phantoms if "Nodule" in p["findings"])
    r = client.post("/explain", files={"file": (item["file"], phantom_bytes(item["file"]),
                                                "image/png")},
                    data={"classes": "Nodule"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["label"] for p in body["predictions"]] == LABELS
    assert body["image"] == {"width": 256, "height": 256, "format": "png", "dicom": None}
    assert [(e["method"], e["label"]) for e in body["explanations"]] == [
        ("gradcam", "Nodule"), ("crm", "Nodule")]
    for e in body["explanations"]:
        heat = _png(e["heatmap"]["data"])
        assert heat.shape == (256, 256) and heat.dtype == np.uint8
        # Max-normalised on the 16×16 grid: the upsampled peak falls between grid centres.
        assert 245 <= heat.max() <= 255
        assert e["regions"], "a non-empty map has at least one region"
    assert body["timings_ms"]["total"] >= body["timings_ms"]["forward"] > 0


def test_raw_body_equals_multipart(client: TestClient, phantoms) -> None:  # type: ignore[no-untyped-def]
    name = phantoms[1]["file"]
    data = phantom_bytes(name)
    params = {"methods": "crm,gradcam", "classes": "0,3", "heatmap": "npy", "size": "feature"}
    raw = client.post("/explain", content=data, params=params,
                      headers={"content-type": "image/png"}).json()
    form = client.post("/explain", files={"file": ("a.png", data, "image/png")},
                       data=params).json()
    assert [p["score"] for p in raw["predictions"]] == [p["score"] for p in form["predictions"]]
    for a, b in zip(raw["explanations"], form["explanations"]):
        np.testing.assert_array_equal(_npy(a["heatmap"]["data"]), _npy(b["heatmap"]["data"]))


def test_npy_maps_equal_brute_force_references(client: TestClient, demo, phantoms) -> None:  # type: ignore[no-untyped-def]
    name = next(p for p in phantoms if "Cardiomegaly" in p["findings"])["file"]
    data = phantom_bytes(name)
    r = client.post("/explain", content=data, headers={"content-type": "image/png"},
                    params={"methods": "crm,crm_combined,gradcam", "classes": "Cardiomegaly",
                            "heatmap": "npy", "size": "feature"})
    assert r.status_code == 200, r.text
    maps = {e["method"]: _npy(e["heatmap"]["data"]) for e in r.json()["explanations"]}

    engine = demo.engine
    x = to_model_input(decode(data, "image/png"), demo.config.input)
    acts, logits = engine.forward(x.tensor)
    a = acts[0].astype(np.float64)
    _, h, w = a.shape
    # CRM: zero each location, one copy at a time, through the real head.
    crm = np.zeros((h, w))
    combined = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            masked = acts.copy()
            masked[0, :, i, j] = 0
            delta = (logits[0].astype(np.float64) - engine.head(masked)[0]) ** 2
            crm[i, j] = delta[0]
            combined[i, j] = delta.sum()
    np.testing.assert_allclose(maps["crm"], crm, rtol=1e-3, atol=1e-6 * crm.max())
    np.testing.assert_allclose(maps["crm_combined"], combined, rtol=1e-3,
                               atol=1e-6 * combined.max())
    # Grad-CAM from a central-difference gradient of the head (float32 head, so eps is large
    # and the check loose; the exact checks live in tests/graph and tests/methods).
    rng = np.random.default_rng(0)
    direction = rng.normal(size=a.shape)
    eps = 1e-2
    up = engine.head((a + eps * direction)[None].astype(np.float32))[0, 0]
    down = engine.head((a - eps * direction)[None].astype(np.float32))[0, 0]
    seed = np.zeros((1, len(LABELS)), np.float32)
    seed[0, 0] = 1
    grad = engine.head_vjp(acts, seed)[0].astype(np.float64)
    assert abs((up - down) / (2 * eps) - (grad * direction).sum()) < 2e-3 * np.abs(grad).sum()
    alpha = grad.mean(axis=(1, 2))
    expected = np.maximum(np.einsum("c,chw->hw", alpha, a), 0)
    np.testing.assert_allclose(maps["gradcam"], expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_sizes_and_encodings(client: TestClient) -> None:
    data = (DATA / "raster" / "nodule_pleural-effusion_400x512.png").read_bytes()
    def one(**params: str) -> dict:  # type: ignore[type-arg]
        r = client.post("/explain", content=data, headers={"content-type": "image/png"},
                        params={"methods": "gradcam", "classes": "Nodule", **params})
        assert r.status_code == 200, r.text
        return r.json()["explanations"][0]  # type: ignore[no-any-return]

    # By default maps come on the network's input grid, for the client to stretch.
    default = one()
    assert default["heatmap"] | {"data": None} == {
        "encoding": "png", "media_type": "image/png", "width": 256, "height": 256,
        "data": None}
    feature = one(size="feature", heatmap="npy")
    assert feature["heatmap"]["media_type"] == "application/x-npy"
    raw = _npy(feature["heatmap"]["data"])
    assert raw.shape == (16, 16) and raw.dtype == np.float32
    # The PNG map is the raw map max-normalised on its own grid, bilinearly upsampled once
    # to the asked grid and rounded to 8 bits.
    np.testing.assert_allclose(_png(default["heatmap"]["data"]),
                               drawing.strength(raw, 256, 256), atol=1)
    original = one(size="original")
    assert (original["heatmap"]["width"], original["heatmap"]["height"]) == (400, 512)
    np.testing.assert_allclose(_png(original["heatmap"]["data"]),
                               drawing.strength(raw, 512, 400), atol=1)
    assert original["regions"] == default["regions"], "regions do not depend on the size"
    npy = _npy(one(size="original", heatmap="npy")["heatmap"]["data"])
    np.testing.assert_allclose(npy, cv2.resize(raw, (400, 512), interpolation=cv2.INTER_LINEAR),
                               rtol=1e-6, atol=1e-6 * float(raw.max()))
    # Overlays are JPEG pictures of the same 8-bit map over the image.
    image01 = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) / 255
    for size, (h, w) in (("model", (256, 256)), ("original", (512, 400))):
        heatmap = one(heatmap="overlay", size=size)["heatmap"]
        assert (heatmap["media_type"], heatmap["width"], heatmap["height"]) == (
            "image/jpeg", w, h)
        picture = cv2.cvtColor(_png(heatmap["data"]), cv2.COLOR_BGR2RGB).astype(float)
        backdrop = cv2.resize(image01, (w, h), interpolation=cv2.INTER_AREA)
        expected = drawing.overlay(drawing.strength(raw, h, w), backdrop)
        assert np.abs(picture - expected).mean() < 2.5, "JPEG q90 of the reference overlay"
    # Regions are in original pixels: inside the 400×512 image.
    for region in original["regions"]:
        x0, y0, x1, y1 = region["box"]
        assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 512


def test_default_classes_are_those_over_threshold(client: TestClient, phantoms) -> None:  # type: ignore[no-untyped-def]
    name = phantoms[0]["file"]
    body = client.post("/explain", content=phantom_bytes(name),
                       headers={"content-type": "image/png"},
                       params={"methods": "gradcam", "score_threshold": "0.5"}).json()
    over = [p["label"] for p in body["predictions"] if p["score"] >= 0.5]
    top = max(body["predictions"], key=lambda p: p["score"])["label"]
    assert [e["label"] for e in body["explanations"]] == (over or [top])


def test_probability_target_changes_gradcam_scale_only(client: TestClient, phantoms) -> None:  # type: ignore[no-untyped-def]
    # For a sigmoid output, d p/dA = p(1 − p) · d z/dA: the same map, scaled.
    data = phantom_bytes(phantoms[2]["file"])
    def gradcam(target: str) -> np.ndarray:
        r = client.post("/explain", content=data, headers={"content-type": "image/png"},
                        params={"methods": "gradcam", "classes": "0", "heatmap": "npy",
                                "size": "feature", "target": target})
        return _npy(r.json()["explanations"][0]["heatmap"]["data"]), r.json()["predictions"][0]["score"]
    logit_map, p = gradcam("logit")
    prob_map, _ = gradcam("probability")
    np.testing.assert_allclose(prob_map, logit_map * p * (1 - p), rtol=2e-3,
                               atol=1e-6 * logit_map.max())


def test_phantom_dicom(client: TestClient) -> None:
    data = (DATA / "dicom" / "phantom_nodule.dcm").read_bytes()
    r = client.post("/explain", content=data, headers={"content-type": "application/dicom"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"]["format"] == "dicom"
    assert body["image"]["dicom"]["study_instance_uid"]
    nodule = body["predictions"][1]
    assert nodule["label"] == "Nodule" and nodule["score"] > 0.5
    mono1 = client.post("/predict", content=(DATA / "dicom" / "phantom_nodule_mono1.dcm")
                        .read_bytes(), headers={"content-type": "application/dicom"}).json()
    # MONOCHROME1 is inverted on decoding: the same scores as the MONOCHROME2 original.
    np.testing.assert_allclose([p["score"] for p in mono1["predictions"]],
                               [p["score"] for p in body["predictions"]], atol=1e-4)


def test_real_radiograph_from_pydicom_data(client: TestClient) -> None:
    path = get_testdata_file("RG1_J2KR.dcm", download=False)
    assert path is not None
    with open(path, "rb") as f:
        data = f.read()
    r = client.post("/explain", files={"file": ("rg1.dcm", data, "application/dicom")},
                    data={"methods": "gradcam,crm_combined"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"]["format"] == "dicom"
    assert body["image"]["dicom"]["modality"] == "CR"
    assert len(body["predictions"]) == 4
    assert (body["image"]["width"], body["image"]["height"]) == (1841, 1955)
    for e in body["explanations"]:
        assert _png(e["heatmap"]["data"]).shape == (256, 256), "maps on the model grid"


def test_default_answer_for_a_real_radiograph_is_small(client: TestClient) -> None:
    """No default ever ships full-size maps: the default answer stays under 400 kB."""
    data = _pydicom_data("RG1_UNCR.dcm")
    r = client.post("/explain", content=data, headers={"content-type": "application/dicom"},
                    params={"classes": "0,1,2,3"})  # every label: the most maps by default
    assert r.status_code == 200, r.text
    assert len(r.json()["explanations"]) == 8
    assert len(r.content) <= 400_000, len(r.content)
    full = client.post("/explain", content=data, headers={"content-type": "application/dicom"},
                       params={"classes": "0", "methods": "gradcam", "size": "original"})
    assert _png(full.json()["explanations"][0]["heatmap"]["data"]).shape == (1955, 1841)


def test_a_parameter_given_twice_is_refused(client: TestClient) -> None:
    png = phantom_bytes("normal.png")
    r = client.post("/explain", files={"file": ("a.png", png, "image/png")},
                    data={"methods": "crm"}, params={"methods": "gradcam"})
    body = r.json()
    assert (r.status_code, body["code"]) == (422, "repeated_parameter")
    assert body["detail"].startswith("parameter 'methods' is given more than once")
    r = client.post("/explain?size=model&size=original", content=png,
                    headers={"content-type": "image/png"})
    assert (r.status_code, r.json()["code"]) == (422, "repeated_parameter")


def test_predict(client: TestClient, phantoms) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/predict", files={"file": ("p.png", phantom_bytes(phantoms[0]["file"]))})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"model", "image", "predictions", "timings_ms"}
    assert body["model"] == {"name": "demo-cxr", "version": "1"}
    assert all(0 <= p["score"] <= 1 for p in body["predictions"])


def _without_timings(answer: dict) -> dict:  # type: ignore[type-arg]
    return {k: v for k, v in answer.items() if k != "timings_ms"}


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate"])
def test_a_compressed_upload_gets_the_plain_uploads_answer(client: TestClient,
                                                           encoding: str) -> None:
    """A raw DICOM body and a whole multipart form, each sent as Content-Encoding gzip
    (or x-gzip, its old name) or deflate (a proxy's or an HTTP library's doing), are
    answered as sent plain."""
    pack = zlib.compress if encoding == "deflate" else gzip.compress
    dicom = (DATA / "dicom" / "phantom_nodule.dcm").read_bytes()
    form = (b'--b\r\ncontent-disposition: form-data; name="methods"\r\n\r\ngradcam,crm\r\n'
            b'--b\r\ncontent-disposition: form-data; name="file"; filename="n.png"\r\n'
            b"content-type: image/png\r\n\r\n" + phantom_bytes("nodule.png") + b"\r\n--b--\r\n")
    for path, body, content_type in (
            ("/explain", dicom, "application/dicom"),
            ("/predict", dicom, "application/dicom"),
            ("/explain", form, "multipart/form-data; boundary=b")):
        answers = [client.post(path, content=data, params={"heatmap": "npy"}
                               if path == "/explain" else {},
                               headers={"content-type": content_type, **headers})
                   for data, headers in ((body, {}),
                                         (pack(body), {"content-encoding": encoding}))]
        assert [r.status_code for r in answers] == [200, 200], answers[1].text
        assert _without_timings(answers[1].json()) == _without_timings(answers[0].json())


def test_a_compressed_upload_that_does_not_inflate_is_refused(client: TestClient) -> None:
    dicom = (DATA / "dicom" / "phantom_nodule.dcm").read_bytes()
    packed = gzip.compress(dicom)
    for body, encoding, status, code, detail in (
            (b"not gzip at all", "gzip", 400, "invalid_content_encoding",
             "the body is not valid gzip data"),
            (packed[:-100], "gzip", 400, "invalid_content_encoding", "the gzip body is truncated"),
            (zlib.compress(dicom) + b"more", "deflate", 400, "invalid_content_encoding",
             "the body holds bytes after its deflate data"),
            (packed, "br", 415, "unsupported_media_type",
             "Content-Encoding 'br' is not gzip or deflate"),
            # 64 MiB and one byte of zeros in 65 kB: inflating stops at the upload limit.
            (gzip.compress(bytes(64 * 2**20 + 1), compresslevel=1), "gzip", 413,
             "payload_too_large", "the body inflates to more than the limit of 67108864 bytes")):
        r = client.post("/explain", content=body, headers={"content-type": "application/dicom",
                                                           "content-encoding": encoding})
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert (r.json()["code"], r.json()["detail"]) == (code, detail)


def test_an_upload_is_explained_as_viewers_show_it(client: TestClient) -> None:
    """A PNG stored turned a quarter anticlockwise, with the EXIF orientation that turns it
    back (6: 90° clockwise, as a phone writes a photo taken sideways), gets exactly the
    answer of the upright PNG: the network sees the upright image, and sizes, boxes and
    maps are in the picture browsers show."""
    phantom = cv2.imdecode(np.frombuffer(phantom_bytes("all-findings.png"), np.uint8),
                           cv2.IMREAD_GRAYSCALE)
    upright = np.ascontiguousarray(phantom[:, 32:224])  # 256 high, 192 wide: not square
    stored = np.ascontiguousarray(np.rot90(upright, 1))
    assert np.array_equal(DISPLAYED[6](stored), upright)
    tagged = png_with_exif(cv2.imencode(".png", stored)[1].tobytes(), orientation_tiff(6))
    params = {"methods": "gradcam,crm", "classes": "0,1,2,3", "heatmap": "npy",
              "size": "original"}
    answers = [client.post("/explain", content=data, headers={"content-type": "image/png"},
                           params=params)
               for data in (cv2.imencode(".png", upright)[1].tobytes(), tagged)]
    assert [r.status_code for r in answers] == [200, 200], answers[1].text
    want, got = (r.json() for r in answers)
    assert got["image"] == want["image"] == {"width": 192, "height": 256, "format": "png",
                                             "dicom": None}
    assert got["predictions"] == want["predictions"]
    for mine, theirs in zip(got["explanations"], want["explanations"], strict=True):
        assert mine["regions"] == theirs["regions"]
        np.testing.assert_array_equal(_npy(mine["heatmap"]["data"]),
                                      _npy(theirs["heatmap"]["data"]))
        assert _npy(mine["heatmap"]["data"]).shape == (256, 192)


def test_gradient_maps_give_regions_not_pixels(client: TestClient) -> None:
    data = (DATA / "dicom" / "phantom_nodule.dcm").read_bytes()
    r = client.post("/explain", content=data, headers={"content-type": "application/dicom"},
                    params={"methods": "guided_backprop,guided_gradcam", "classes": "Nodule"})
    assert r.status_code == 200, r.text
    mask = cv2.imread(str(DATA / "phantoms" / "nodule.mask-nodule.png"), cv2.IMREAD_GRAYSCALE)
    ys, xs = np.nonzero(mask)
    for e in r.json()["explanations"]:
        regions = e["regions"]
        assert 1 <= len(regions) <= 3, (e["method"], regions)
        x0, y0, x1, y1 = regions[0]["box"]
        assert x1 - x0 >= 5 and y1 - y0 >= 5
        # The strongest region of Guided Grad-CAM covers the nodule's centre.
        if e["method"] == "guided_gradcam":
            assert x0 <= xs.mean() < x1 and y0 <= ys.mean() < y1


def _pydicom_data(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    # pydicom-data is a pinned test dependency: a missing file is a broken install.
    assert path is not None, f"{name} is not in the installed pydicom-data"
    with open(path, "rb") as f:
        return f.read()


def test_multiframe_dicom_echoes_the_decoded_frame(any_dicom_client: TestClient) -> None:
    client = any_dicom_client  # the chest model's guard refuses MR
    data = _pydicom_data("emri_small.dcm")  # 10 frames of 64 x 64 MR
    def scores(frame: str) -> tuple[dict, list[float]]:  # type: ignore[type-arg]
        r = client.post("/explain", content=data, params={"frame": frame, "methods": "gradcam"},
                        headers={"content-type": "application/dicom"})
        assert r.status_code == 200, r.text
        body = r.json()
        return body["image"]["dicom"], [p["score"] for p in body["predictions"]]

    dicom3, scores3 = scores("3")
    assert dicom3["frames"] == 10 and dicom3["frame"] == 3
    dicom0, scores0 = scores("0")
    assert dicom0["frame"] == 0
    assert not np.allclose(scores3, scores0, atol=1e-4)
    predicted = client.post("/predict", content=data, params={"frame": "9"},
                            headers={"content-type": "application/dicom"}).json()
    assert predicted["image"]["dicom"]["frame"] == 9


def test_frame_limit(tmp_path: Path) -> None:
    from service.config import Settings
    from service.main import create_app
    from tests.api.conftest import assert_problem, unguarded_models

    data = _pydicom_data("emri_small.dcm")
    # Without the chest model's guard, which refuses MR.
    settings = Settings(models=unguarded_models(tmp_path), max_frames=9, threads=1)
    with TestClient(create_app(settings)) as small:
        for route in ("/explain", "/predict"):
            r = small.post(route, content=data, headers={"content-type": "application/dicom"})
            body = assert_problem(r, 422, "too_many_frames")
            assert body["detail"] == "the DICOM object has 10 frames; the limit is 9"
        ok = small.post("/predict", content=_pydicom_data("MR_small.dcm"),
                        headers={"content-type": "application/dicom"})
        assert ok.status_code == 200, ok.text


def test_big_jpeg2000_radiograph_is_decoded_reduced_but_answered_in_original_pixels(
        demo) -> None:  # type: ignore[no-untyped-def]
    from service.config import Settings
    from service.main import create_app

    # Reduced-resolution JPEG 2000 decoding is opt-in (full resolution by default).
    settings = Settings(models=MODELS, threads=1, j2k_reduced_resolution=True)
    data = _pydicom_data("RG1_J2KR.dcm")  # 1841 x 1955 MONOCHROME1, J2K lossless
    with TestClient(create_app(settings)) as reduced:
        r = reduced.post("/explain", content=data,
                         headers={"content-type": "application/dicom"},
                         params={"methods": "gradcam,fixations", "classes": "Nodule",
                                 "heatmap": "overlay", "size": "original"})
        assert r.status_code == 200, r.text
        predicted = reduced.post("/predict", content=data,
                                 headers={"content-type": "application/dicom"}).json()
    body = r.json()
    assert (body["image"]["width"], body["image"]["height"]) == (1841, 1955)
    for e in body["explanations"]:
        assert (e["heatmap"]["width"], e["heatmap"]["height"]) == (1841, 1955)
        assert _png(e["heatmap"]["data"]).shape == (1955, 1841, 3)
        for region in e["regions"]:
            x0, y0, x1, y1 = region["box"]
            assert 0 <= x0 < x1 <= 1841 and 0 <= y0 < y1 <= 1955
    points = next(e["points"] for e in body["explanations"] if e["method"] == "fixations")
    assert points
    for x, y in points:
        assert 0 <= x <= 1840 and 0 <= y <= 1954
    # The same request in-process at full resolution: boxes scale with the image, so
    # they land on the same places (one model-grid cell is 7.2 x 7.6 original pixels).
    # Scores: the reduced decode (489 x 461, then 256 x 256) and the full one differ by
    # 0.08 at most (Pneumothorax, logit +0.35), less than cropping 4 pixels off the full
    # image changes them (up to 1.36 in logit): this out-of-distribution radiograph
    # sits on a steep part of the synthetic demo model's sigmoid.
    full = decode(data, "application/dicom")
    assert full.pixels.shape == (1955, 1841)
    logits = demo.engine.forward(to_model_input(full, demo.config.input).tensor)[1]
    expected = demo.config.activation.scores(logits)[0]
    scores = [p["score"] for p in body["predictions"]]
    np.testing.assert_allclose(scores, expected, atol=0.1)
    assert not np.allclose(scores, expected, atol=1e-3)  # it was decoded reduced
    # The fixations graph's forward pass stood in for the backbone's: the same scores
    # within float rounding (its GEMM is unpacked; service.runtime.engine).
    np.testing.assert_allclose([p["score"] for p in predicted["predictions"]], scores,
                               rtol=0, atol=2e-6)


def test_fixations_points_equal_the_in_process_walk(client: TestClient, demo, phantoms) -> None:  # type: ignore[no-untyped-def]
    item = next(p for p in phantoms if p["findings"])
    data = phantom_bytes(item["file"])
    r = client.post("/explain", content=data, headers={"content-type": "image/png"},
                    params={"methods": "fixations", "classes": "0,1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [e["method"] for e in body["explanations"]] == ["fixations", "fixations"]
    from service.methods import METHODS, rows

    spec = demo.config.input
    captures = demo.engine.capture(to_model_input(decode(data, "image/png"), spec).tensor,
                                   demo.config.activation, spec)
    expected = METHODS["fixations"].compute(captures, rows([0, 1]))
    for e, raw in zip(body["explanations"], expected):
        # A 256² phantom on a 256² network: image pixels are model pixels.
        assert raw.points is not None and len(raw.points)
        np.testing.assert_allclose(np.asarray(e["points"]), raw.points.astype(float))
        heat = _png(e["heatmap"]["data"])
        assert heat.shape == (256, 256) and heat.max() == 255
