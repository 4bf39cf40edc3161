"""Mutated uploads never make the service answer 5xx (bounded, seeded fuzzing)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from tests.api.conftest import DATA, phantom_bytes


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
    statuses = []
    for _ in range(40):
        r = client.post("/explain", content=_mutate(data, rng),
                        headers={"content-type": media_type},
                        params={"methods": "gradcam,crm", "classes": "0"})
        assert r.status_code < 500, (source, r.status_code, r.text[:300])
        if r.status_code != 200:
            assert r.headers["content-type"].startswith("application/problem+json")
        statuses.append(r.status_code)
    assert 400 in statuses or 413 in statuses or 415 in statuses  # the mutations bite
