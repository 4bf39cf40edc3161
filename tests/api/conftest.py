from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
MODELS = ROOT / "models"


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(models=MODELS, threads=1)


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="session")
def phantoms() -> list[dict[str, object]]:
    manifest = json.loads((DATA / "phantoms" / "manifest.json").read_text())
    return manifest  # type: ignore[no-any-return]


def phantom_bytes(name: str) -> bytes:
    return (DATA / "phantoms" / name).read_bytes()


def post_dicom(client: TestClient, data: bytes, accept: str | None, **params: str):  # type: ignore[no-untyped-def]
    """POST a DICOM body to /explain with an optional Accept header."""
    headers = {"content-type": "application/dicom"}
    if accept is not None:
        headers["accept"] = accept
    return client.post("/explain", content=data, headers=headers, params=params)


def read_dicom(data: bytes):  # type: ignore[no-untyped-def]
    return pydicom.dcmread(io.BytesIO(data))


def assert_problem(response, status: int, code: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["title"] and body["detail"]
    return body  # type: ignore[no-any-return]
