"""The web demo at GET /: served with its modules, in step with the API it calls, and the
image preview it asks for when the browser cannot decode the upload (DICOM).

The page itself is exercised in a real browser in tests/web/.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import cv2
import numpy as np
import pydicom
from fastapi.testclient import TestClient

from service.api.request import ExplainParams
from service.methods import METHODS
from tests.api.conftest import DATA, assert_problem, phantom_bytes

STATIC = Path(__file__).resolve().parents[2] / "service" / "static"
DCM = DATA / "dicom" / "phantom_nodule.dcm"


def _modules() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in STATIC.glob("*.js")}


def test_the_page_and_its_modules_are_served(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<title>medexplain</title>" in r.text
    linked = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', r.text))
    assert linked == {"/static/app.js", "/static/demo.css", "/static/favicon.svg"}
    imported = {f"/static/{name}" for text in _modules().values()
                for name in re.findall(r'from "\./([\w.]+)"', text)}
    assert imported == {f"/static/{n}" for n in _modules()} - {"/static/app.js"}
    for path in linked | imported:
        asset = client.get(path)
        assert asset.status_code == 200, path
        if path.endswith(".js"):  # module scripts need a JavaScript media type
            assert asset.headers["content-type"].startswith("text/javascript")


def test_the_page_loads_nothing_from_elsewhere() -> None:
    for name, text in {**_modules(), "index.html": (STATIC / "index.html").read_text(),
                       "demo.css": (STATIC / "demo.css").read_text()}.items():
        assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]", text, re.IGNORECASE), name
        assert "@import" not in text and "url(" not in text, name


def test_the_page_calls_only_what_the_api_offers(client: TestClient) -> None:
    api = _modules()["api.js"]
    paths = {re.sub(r"\$\{.*?\)\}", "{name}", p)
             for _, p in re.findall(r'call\((["`])(.*?)\1', api)}
    assert paths == {"/models", "/models/{name}", "/explain"}
    assert paths <= set(client.get("/openapi.json").json()["paths"])
    app = _modules()["app.js"]
    request = app[app.index("function requestParams"):app.index("async function run")]
    sent = set(re.findall(r"^\s+(\w+):", request, re.MULTILINE))
    assert sent == {"model", "methods", "classes", "target", "window", "frame",
                    "score_threshold", "region_threshold", "heatmap", "size", "preview"}
    downloads = app[app.index("async function downloadDicom"):app.index("// ----", app.index(
        "async function downloadDicom"))]
    sent |= set(re.findall(r"(\w+): ", downloads)) & set(ExplainParams.model_fields)
    assert "dicom" in sent and sent <= set(ExplainParams.model_fields)
    # The values it sends are ones /explain takes.
    assert 'heatmap: "npy"' in request and 'size: "model"' in request
    r = client.post("/explain", files={"file": ("n.png", phantom_bytes("nodule.png"))},
                    data={"heatmap": "npy", "size": "model", "preview": "true",
                          "methods": "gradcam", "score_threshold": "0.5",
                          "region_threshold": "0.3", "target": "logit", "model": "demo-cxr"})
    assert r.status_code == 200, r.text


def test_the_page_knows_which_maps_live_on_the_input_grid() -> None:
    """maps.js blurs input-grid maps for regions and pictures exactly where the service does."""
    listed = re.search(r"INPUT_GRID_METHODS = new Set\(\[([^\]]*)\]\)", _modules()["maps.js"])
    assert listed is not None
    assert set(re.findall(r'"(\w+)"', listed.group(1))) == {
        name for name, method in METHODS.items() if method.grid == "model"}


def test_preview_is_what_the_network_saw(client: TestClient) -> None:
    png = phantom_bytes("nodule.png")
    plain = client.post("/explain", files={"file": ("n.png", png)}, data={"methods": "gradcam"})
    assert plain.json()["preview"] is None  # only when asked for
    body = client.post("/explain", files={"file": ("n.png", png)},
                       data={"methods": "gradcam", "preview": "true"}).json()
    preview = body["preview"]
    assert (preview["media_type"], preview["width"], preview["height"]) == ("image/png", 256, 256)
    shown = cv2.imdecode(np.frombuffer(base64.b64decode(preview["data"]), np.uint8),
                         cv2.IMREAD_UNCHANGED)
    assert np.array_equal(shown, cv2.imdecode(np.frombuffer(png, np.uint8), 0))

    # A DICOM: its stored values through the file's window (centre 2048, width 4096).
    dicom = client.post("/explain", content=DCM.read_bytes(),
                        headers={"content-type": "application/dicom"},
                        params={"methods": "gradcam", "preview": "1"}).json()["preview"]
    shown = cv2.imdecode(np.frombuffer(base64.b64decode(dicom["data"]), np.uint8), 0)
    ds = pydicom.dcmread(DCM)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    stored = ds.pixel_array.astype(np.float64)
    expected = np.clip((stored - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255  # PS3.3 C.11.2.1.2
    assert np.abs(shown - expected).max() <= 1.0


def test_preview_follows_the_size_asked_for(client: TestClient) -> None:
    png = (DATA / "raster" / "nodule_pleural-effusion_400x512.png").read_bytes()
    for size, grid in (("model", (256, 256)), ("original", (512, 400)),
                       ("feature", (256, 256))):
        body = client.post("/explain", files={"file": ("x.png", png)},
                           data={"methods": "gradcam", "preview": "true", "size": size}).json()
        assert (body["preview"]["height"], body["preview"]["width"]) == grid, size
        drawn = cv2.imdecode(np.frombuffer(base64.b64decode(body["preview"]["data"]),
                                           np.uint8), 0)
        assert drawn.shape == grid
        if size == "original":
            full = drawn
    sixteen = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert sixteen.dtype == np.uint16  # a 16-bit PNG, shown on 8 bits
    assert np.abs(full - np.round(sixteen / 65535 * 255)).max() <= 1


def test_preview_must_be_a_boolean(client: TestClient) -> None:
    r = client.post("/explain", files={"file": ("n.png", phantom_bytes("nodule.png"))},
                    data={"preview": "perhaps"})
    body = assert_problem(r, 422, "invalid_parameter")
    assert body["detail"].startswith("preview='perhaps'")
