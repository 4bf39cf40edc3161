"""A model folder that fails to load is UNAVAILABLE with its reason and answers 503
model_unavailable, while the others serve; only a repository where nothing loads stops
the start-up. Before: one broken folder stopped the whole service (exit 3)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.errors import ModelError
from service.main import create_app
from tests.api.conftest import MODELS, assert_problem, phantom_bytes

PNG = {"content-type": "image/png"}


def _broken_repository(root: Path) -> Path:
    shutil.copytree(MODELS / "demo-cxr", root / "demo-cxr")
    garbage = root / "x-garbage-onnx"
    shutil.copytree(MODELS / "demo-cxr", garbage)
    (garbage / "model.onnx").write_bytes(b"\x08\x07 not a protobuf" * 100)
    bad_toml = root / "x-bad-toml"
    shutil.copytree(MODELS / "demo-cxr", bad_toml)
    (bad_toml / "model.toml").write_text("labels = [\n")
    truncated = root / "x-truncated"
    shutil.copytree(MODELS / "demo-cxr", truncated)
    data = (truncated / "model.onnx").read_bytes()
    (truncated / "model.onnx").write_bytes(data[: len(data) // 2])
    ensemble = root / "x-ensemble"
    ensemble.mkdir()
    (ensemble / "ensemble.toml").write_text('members = ["demo-cxr", "x-bad-toml"]\n')
    return root


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = _broken_repository(tmp_path_factory.mktemp("models"))
    with TestClient(create_app(Settings(models=root, threads=1))) as c:
        yield c


def test_the_broken_ones_are_listed_with_their_reason(client: TestClient) -> None:
    listed = client.get("/models").json()
    assert [m["name"] for m in listed["models"]] == ["demo-cxr"]
    assert listed["default"] == "demo-cxr"
    reasons = {m["name"]: m["reason"] for m in listed["unavailable"]}
    assert sorted(reasons) == ["x-bad-toml", "x-ensemble", "x-garbage-onnx", "x-truncated"]
    assert all(m["state"] == "UNAVAILABLE" for m in listed["unavailable"])
    assert reasons["x-bad-toml"].startswith("model.toml in x-bad-toml: ")
    assert reasons["x-garbage-onnx"].startswith("x-garbage-onnx/model.onnx: ")
    assert reasons["x-ensemble"] == "member x-bad-toml is unavailable"


@pytest.mark.parametrize("name", ["x-bad-toml", "x-garbage-onnx", "x-truncated",
                                  "x-ensemble"])
def test_requests_to_a_broken_model_get_503(client: TestClient, name: str) -> None:
    png = phantom_bytes("normal.png")
    for path in ("/predict", "/explain"):
        r = client.post(path, params={"model": name}, content=png, headers=PNG)
        body = assert_problem(r, 503, "model_unavailable")
        assert body["detail"].startswith(f"model {name!r} failed to load: ")
        assert "retry-after" not in r.headers  # it will not come back by itself
    assert_problem(client.get(f"/models/{name}"), 503, "model_unavailable")


def test_the_others_still_serve(client: TestClient) -> None:
    r = client.post("/predict", content=phantom_bytes("all-findings.png"), headers=PNG)
    assert r.status_code == 200
    assert r.json()["model"]["name"] == "demo-cxr"
    assert client.get("/readyz").json() == {"status": "ready"}


def test_nothing_loads_nothing_starts(tmp_path: Path) -> None:
    _broken_repository(tmp_path)
    shutil.rmtree(tmp_path / "demo-cxr")
    with pytest.raises(ModelError, match=r"^no model could be loaded: x-bad-toml: model.toml"), \
            TestClient(create_app(Settings(models=tmp_path, threads=1))):
        pass
