"""MEDEXPLAIN_MAX_ANSWER_BYTES (service.outputs.limit): an answer past the limit is a 422
answer_too_large on every route that writes maps, while the same request under a limit
just above what its answer holds, or asking for less, is answered as before."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import JPEGLSLossless

from service.config import Settings
from service.errors import AnswerTooLarge
from service.main import create_app
from service.outputs.limit import AnswerLimit, held, spend
from tests.api.conftest import DATA, MODELS, assert_problem, multipart_items, phantom_bytes

PHANTOM = (DATA / "dicom" / "phantom_nodule.dcm").read_bytes()
MULTIPART = 'multipart/related; type="application/dicom"'
EIGHT = {"methods": "gradcam,crm,guided_gradcam,fixations", "classes": "Nodule,Pneumothorax"}


def test_spending_is_counted_per_limit_and_free_outside_one() -> None:
    spend(10**12)  # no limit applied: nothing is counted
    limit = AnswerLimit(100)
    with limit.applied():
        spend(60)
        spend(40)  # exactly the limit is allowed
        with pytest.raises(AnswerTooLarge, match="more than 100 bytes"):
            spend(1)
    assert limit.spent == 101
    spend(10**12)  # the block is over
    with limit.applied(), pytest.raises(AnswerTooLarge):  # a request's limit adds up
        spend(1)


def test_what_an_encoder_holds_counts_while_it_holds_it() -> None:
    with held(10**12):  # no limit applied: nothing is counted
        pass
    limit = AnswerLimit(100)
    with limit.applied():
        spend(30)
        with held(70):
            assert limit.spent == 100
        assert limit.spent == 30  # given back
        with pytest.raises(AnswerTooLarge), held(71):
            pass
        assert limit.spent == 30  # given back when refused too
        spend(70)  # the answer itself may still reach the limit


def test_a_segmentation_holds_a_byte_per_pixel_and_map() -> None:
    # The phantom is 256 × 256: eight maps' masks hold 512 KiB while the SEG is written,
    # which itself is 8 frames of 8 KiB at most (a bit per pixel).
    params = {**EIGHT, "dicom": "seg"}
    headers = {"content-type": "application/dicom", "accept": "application/dicom"}
    for limit, status in ((256 << 10, 422), (768 << 10, 200)):
        with TestClient(create_app(Settings(models=MODELS, threads=1,
                                            max_answer_bytes=limit))) as client:
            r = client.post("/explain", content=PHANTOM, params=params, headers=headers)
            assert r.status_code == status, r.text
            if status == 200:
                assert len(r.content) < 256 << 10  # the answer alone would have fit
            # The presentation state of the same maps holds no masks.
            r = client.post("/explain", content=PHANTOM, params={**EIGHT, "dicom": "gsps"},
                            headers=headers)
            assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def sizes() -> dict[str, int]:
    """What the answers below hold without a limit, in the bytes the limit counts."""
    with TestClient(create_app(Settings(models=MODELS, threads=1))) as client:
        npy = client.post("/explain", content=PHANTOM, params={
            **EIGHT, "heatmap": "npy", "size": "original"},
            headers={"content-type": "application/dicom"})
        plain = _captures(client, MULTIPART)
        packed = _captures(client, f"{MULTIPART}; transfer-syntax={JPEGLSLossless}")
    assert npy.status_code == plain.status_code == packed.status_code == 200
    heatmaps = sum(len(e["heatmap"]["data"]) for e in npy.json()["explanations"])
    return {"npy": heatmaps, "plain": len(plain.content), "packed": len(packed.content)}


def _captures(client: TestClient, accept: str):  # type: ignore[no-untyped-def]
    return client.post("/explain", content=PHANTOM, params=EIGHT,
                       headers={"content-type": "application/dicom", "accept": accept})


@pytest.fixture(scope="module")
def limited(sizes: dict[str, int]) -> Iterator[TestClient]:
    """A service whose limit lies between the compressed and the uncompressed captures,
    and below the npy maps."""
    assert sizes["packed"] < sizes["plain"] and sizes["packed"] < sizes["npy"]
    limit = sizes["packed"] + 4096
    with TestClient(create_app(Settings(models=MODELS, threads=1,
                                        max_answer_bytes=limit))) as client:
        yield client


def test_json_maps_past_the_limit_are_refused(limited: TestClient) -> None:
    r = limited.post("/explain", content=PHANTOM, params={**EIGHT, "heatmap": "npy",
                                                          "size": "original"},
                     headers={"content-type": "application/dicom"})
    body = assert_problem(r, 422, "answer_too_large")
    assert "MEDEXPLAIN_MAX_ANSWER_BYTES" in str(body["detail"])
    # The same maps as 8-bit PNGs fit.
    r = limited.post("/explain", content=PHANTOM, params={**EIGHT, "heatmap": "png"},
                     headers={"content-type": "application/dicom"})
    assert r.status_code == 200 and len(r.json()["explanations"]) == 8


def test_captures_past_the_limit_fit_compressed(limited: TestClient,
                                                sizes: dict[str, int]) -> None:
    assert_problem(_captures(limited, MULTIPART), 422, "answer_too_large")
    packed = _captures(limited, f"{MULTIPART}; transfer-syntax={JPEGLSLossless}")
    assert packed.status_code == 200, packed.text
    # Its size is the unlimited answer's, but for the lengths of its new UIDs.
    assert len(multipart_items(packed)) == 8
    assert abs(len(packed.content) - sizes["packed"]) < 1024
    assert limited.get("/healthz").status_code == 200


def test_kserve_counts_every_instance_of_a_request(sizes: dict[str, int]) -> None:
    png = base64.b64encode(phantom_bytes("nodule_pneumothorax.png")).decode("ascii")
    params = {"methods": "gradcam", "classes": "Nodule", "heatmap": "npy", "size": "original"}
    with TestClient(create_app(Settings(models=MODELS, threads=1))) as client:
        one = client.post("/v1/models/demo-cxr:explain", params=params,
                          json={"instances": [{"image_bytes": {"b64": png}}]})
    assert one.status_code == 200, one.text
    held = len(one.json()["explanations"][0]["explanations"][0]["heatmap"]["data"])
    # One instance's map fits; two of them, in one request, do not.
    with TestClient(create_app(Settings(models=MODELS, threads=1,
                                        max_answer_bytes=held + held // 2))) as client:
        r = client.post("/v1/models/demo-cxr:explain", params=params,
                        json={"instances": [{"image_bytes": {"b64": png}}]})
        assert r.status_code == 200, r.text
        r = client.post("/v1/models/demo-cxr:explain", params=params,
                        json={"instances": [{"image_bytes": {"b64": png}}] * 2})
        assert r.status_code == 422 and r.json()["code"] == "answer_too_large", r.text


def test_open_inference_protocol_maps_past_the_limit_are_refused() -> None:
    png = base64.b64encode(phantom_bytes("normal.png")).decode("ascii")
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [png]}],
            "parameters": {"methods": "gradcam,crm", "size": "original",
                           "binary_data_output": True}}
    with TestClient(create_app(Settings(models=MODELS, threads=1,
                                        max_answer_bytes=64 << 10))) as client:
        r = client.post("/v2/models/demo-cxr/infer", json=body)
        assert r.status_code == 422 and r.json()["code"] == "answer_too_large", r.text
        body["parameters"]["size"] = "model"  # 256 x 256 maps, 256 kB each: still too much
        r = client.post("/v2/models/demo-cxr/infer", json=body)
        assert r.status_code == 422
        body["parameters"] = {}  # scores only
        assert client.post("/v2/models/demo-cxr/infer", json=body).status_code == 200
