"""Repeated requests do not grow the process: sessions, arenas and buffers are reused."""

from __future__ import annotations

import os

from fastapi.testclient import TestClient

from tests.api.conftest import DATA, phantom_bytes


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_stays_flat_over_repeated_requests(client: TestClient) -> None:
    png = phantom_bytes("all-findings.png")
    dicom = (DATA / "dicom" / "phantom_nodule.dcm").read_bytes()

    def burst(n: int) -> None:
        for i in range(n):
            r = client.post("/explain", content=png if i % 2 else dicom,
                            headers={"content-type": "image/png" if i % 2
                                     else "application/dicom"},
                            params={"methods": "gradcam,crm,guided_gradcam,fixations",
                                    "classes": "0,1,2,3"})
            assert r.status_code == 200
            assert client.post("/explain", content=b"\x89PNG broken",
                               headers={"content-type": "image/png"}).status_code == 400

    burst(20)  # warm-up: arenas and caches reach their working size
    before = _rss_mib()
    burst(60)
    growth = _rss_mib() - before
    assert growth < 25, f"RSS grew by {growth:.1f} MiB over 60 requests"
