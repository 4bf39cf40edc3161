"""The web demo at GET /: served, and in step with the API it calls."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.api.request import ExplainParams


def test_demo_page_is_served(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<title>medexplain</title>" in r.text


def test_demo_page_uses_only_what_the_api_offers(client: TestClient) -> None:
    page = client.get("/").text
    fields = set(re.findall(r'data\.append\("([a-z_]+)"', page))
    assert fields >= {"file", "model", "methods", "heatmap"}
    assert fields - {"file"} <= set(ExplainParams.model_fields), \
        "the page sends a parameter /explain refuses"
    paths = set(re.findall(r'fetch\("([^"]+)"', page))
    assert paths and paths <= set(client.get("/openapi.json").json()["paths"])
    # The values the page sends are ones the API accepts.
    assert '"heatmap", "overlay"' in page
    info = client.get("/models").json()["models"][0]
    assert {"name", "description", "methods", "default"} <= set(info)
