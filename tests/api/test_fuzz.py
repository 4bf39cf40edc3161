"""Mutated uploads, hostile parameter values and decompression bombs never make the
service answer 5xx (bounded, seeded fuzzing; bombs generated here, never committed)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from service.config import Settings
from service.main import create_app
from service.outputs import DICOM_OUTPUTS
from tests.api.conftest import DATA, phantom_bytes
from tests.imaging import bombs
from tests.imaging.memory import MiB, peak_rss


def _sources() -> dict[str, tuple[bytes, str]]:
    rle = get_testdata_file("MR_small_RLE.dcm", download=False)
    j2k = get_testdata_file("MR_small_jp2klossless.dcm", download=False)
    assert rle is not None and j2k is not None
    return {
        "png": (phantom_bytes("nodule.png"), "image/png"),
        "jpeg": ((DATA / "raster" / "nodule_pleural-effusion_400x512.jpg").read_bytes(),
                 "image/jpeg"),
        "dicom": ((DATA / "dicom" / "phantom_nodule.dcm").read_bytes(), "application/dicom"),
        "dicom-j2k": ((DATA / "dicom" / "phantom_nodule_j2k.dcm").read_bytes(),
                      "application/dicom"),
        "dicom-rle": (Path(rle).read_bytes(), "application/dicom"),
        "dicom-j2k-mr": (Path(j2k).read_bytes(), "application/dicom"),
    }


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:  # flip bytes anywhere
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 16))):
            buf[pos] = int(rng.integers(256))
    elif kind == 1:  # truncate
        del buf[int(rng.integers(1, len(buf))):]
    elif kind == 2:  # corrupt the header region, where lengths and sizes live
        for pos in rng.integers(0, min(len(buf), 1024), size=int(rng.integers(1, 8))):
            buf[pos] = int(rng.integers(256))
    else:  # splice a random chunk in
        pos = int(rng.integers(len(buf)))
        buf[pos:pos] = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    return bytes(buf)


@pytest.mark.parametrize("source", list(_sources()))
def test_mutated_uploads_get_4xx_or_200(client: TestClient, source: str) -> None:
    data, media_type = _sources()[source]
    rng = np.random.default_rng(zlib.crc32(source.encode()))
    statuses, answered = [], []
    for k in range(40):
        headers = {"content-type": media_type}
        params = {"methods": "gradcam,crm", "classes": "0"}
        if media_type == "application/dicom" and k % 2:
            # Every DICOM object, from whatever header survived the decoder.
            headers["accept"] = 'multipart/related; type="application/dicom"'
            params["dicom"] = ",".join(DICOM_OUTPUTS)
        r = client.post("/explain", content=_mutate(data, rng), headers=headers, params=params)
        assert r.status_code < 500, (source, r.status_code, r.text[:300])
        if r.status_code != 200:
            assert r.headers["content-type"].startswith("application/problem+json")
        statuses.append(r.status_code)
        answered.append(r.headers["content-type"].split(";")[0])
    assert 400 in statuses or 413 in statuses or 415 in statuses  # the mutations bite
    if source == "dicom":  # and some still reach the DICOM outputs
        assert "multipart/related" in answered


# Values that look like integers to str.isdigit() but not to int(), or are too long for
# Python's int-string limit: refused as parameters, never a 500.
HOSTILE_PARAMETERS = [
    ("frame", "\u00b2", "invalid_parameter"), ("frame", "\u0663", "invalid_parameter"),
    ("frame", "9" * 5000, "invalid_parameter"), ("classes", "\u00b2", "unknown_label"),
    ("classes", "9" * 5000, "unknown_label"),
]


@pytest.mark.parametrize(("name", "value", "code"), HOSTILE_PARAMETERS,
                         ids=[f"{n}={v[:3]}x{len(v)}" for n, v, _ in HOSTILE_PARAMETERS])
def test_hostile_parameter_values_are_422_everywhere(client: TestClient, name: str, value: str,
                                                     code: str) -> None:
    sources = _sources()
    for path in ("/explain", "/predict"):
        if path == "/predict" and name == "classes":
            code_here = "invalid_parameter"  # /predict takes no classes at all
        else:
            code_here = code
        for kind in ("png", "dicom"):
            data, media_type = sources[kind]
            answers = [
                client.post(path, content=data, params={name: value},
                            headers={"content-type": media_type}),
                client.post(path, files={"file": ("f", data, media_type)}, data={name: value}),
            ]
            for r in answers:
                assert r.status_code == 422, (path, kind, r.status_code, r.text[:200])
                assert r.headers["content-type"].startswith("application/problem+json")
                assert r.json()["code"] == code_here


BOMBS = {
    "png-7000x7000": (lambda: bombs.png_bomb(7000, 7000), "image/png",
                      "decode_budget_exceeded"),
    "jp2-decoy-24000": (lambda: bombs.j2k_decoy_dicom(24000), "application/dicom",
                        "payload_too_large"),
    "jp2-decoy-7000": (lambda: bombs.j2k_decoy_dicom(7000), "application/dicom",
                       "decode_budget_exceeded"),
    "deflated-160MiB": (lambda: bombs.deflate_bomb(160 << 20), "application/dicom",
                        "payload_too_large"),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_decompression_bombs_are_413_in_bounded_memory(client: TestClient, name: str) -> None:
    make, media_type, code = BOMBS[name]
    bomb = make()
    with peak_rss() as peak:
        r = client.post("/explain", content=bomb, headers={"content-type": media_type})
    assert r.status_code == 413, r.text
    assert r.json()["code"] == code
    assert peak.growth < 48 * MiB, peak.growth
    assert client.get("/healthz").status_code == 200


def test_the_decode_budget_is_the_setting(settings: Settings) -> None:
    data = (DATA / "dicom" / "phantom_nodule.dcm").read_bytes()  # 256 x 256, 16 bits
    small = settings.model_copy(update={"max_decode_bytes": 1 << 20})
    with TestClient(create_app(small)) as tight:
        r = tight.post("/predict", content=data, headers={"content-type": "application/dicom"})
    assert r.status_code == 413
    assert r.json()["code"] == "decode_budget_exceeded"
    assert "limit is 1 MiB" in r.json()["detail"]
