from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

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


def small_phantom_png(name: str) -> bytes:
    """A phantom at 64×64 as PNG: decoding is cheap, the network still sees it whole."""
    grey = cv2.imdecode(np.frombuffer(phantom_bytes(name), np.uint8), cv2.IMREAD_GRAYSCALE)
    ok, png = cv2.imencode(".png", cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA))
    assert ok
    return png.tobytes()


def post_dicom(client: TestClient, data: bytes, accept: str | None, *,  # type: ignore[no-untyped-def]
               path: str = "/explain", **params: str):
    """POST a DICOM body to /explain (or ``path``) with an optional Accept header."""
    headers = {"content-type": "application/dicom"}
    if accept is not None:
        headers["accept"] = accept
    return client.post(path, content=data, headers=headers, params=params)


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


def unguarded_models(folder: Path) -> Path:
    """A copy of the bundled repository whose model.toml
    has no ``[accepts]`` table: for tests that feed non-chest DICOMs (MR, CT, extremity
    radiographs) through the pipeline, which the bundled model's guard refuses."""
    for source in sorted(MODELS.iterdir()):
        if not (source / "model.toml").is_file():
            continue
        target = folder / source.name
        target.mkdir(parents=True)
        text = (source / "model.toml").read_text(encoding="utf-8")
        (target / "model.toml").write_text(text.split("[accepts]")[0], encoding="utf-8")
        # Copied, not linked: ONNX Runtime refuses weights outside the model's folder.
        shutil.copyfile(source / "model.onnx", target / "model.onnx")
    return folder


@pytest.fixture(scope="session")
def any_dicom_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A client of the bundled model without its modality / body part guard."""
    models = unguarded_models(tmp_path_factory.mktemp("unguarded"))
    with TestClient(create_app(Settings(models=models, threads=1))) as c:
        yield c


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus sample's values (``name`` as exposed: ``..._total``,
    ``..._count``) over those whose labels include ``labels``."""
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def explanations_computed(client: TestClient) -> float:
    """How many (request, method) explanations the app has computed: the count of its
    method-duration histogram on /metrics."""
    return metric_sum(client.get("/metrics").text, "medexplain_method_duration_seconds_count")


def multipart_parts(response) -> list[bytes]:  # type: ignore[no-untyped-def]
    """The bodies of a multipart/related response, each checked to be application/dicom
    in the default transfer syntax (no transfer-syntax parameter)."""
    assert response.headers["content-type"].startswith(
        'multipart/related; type="application/dicom"; boundary=')
    items = multipart_items(response)
    assert {media for media, _ in items} == {"application/dicom"}, items
    return [payload for _, payload in items]


def multipart_items(response) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
    """The parts of a multipart/related response: each one's Content-Type and body."""
    content_type = response.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom";')
    boundary = re.search(r"boundary=([^;]+)", content_type)
    assert boundary is not None
    delimiter = b"--" + boundary.group(1).encode()
    body = response.content
    assert body.endswith(delimiter + b"--\r\n")
    chunks = body[: -len(delimiter + b"--\r\n")].split(delimiter)
    assert chunks[0] == b""
    items = []
    for chunk in chunks[1:]:
        head, _, payload = chunk.partition(b"\r\n\r\n")
        name, _, media = head.strip().decode("ascii").partition(": ")
        assert name == "Content-Type", head
        assert payload.endswith(b"\r\n")
        items.append((media, payload[:-2]))
    return items
