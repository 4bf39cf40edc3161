"""HEAD on every GET resource: GET's status and headers, no body (RFC 9110 §9.3.2)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.api.live import live_server, request_head

# Headers that may differ between two answers to the same request.
_PER_ANSWER = {"date", "x-request-id", "content-length"}


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/models", "/models/demo-cxr", "/",
                                  "/docs", "/openapi.json", "/static/app.js", "/v2",
                                  "/v2/models/demo-cxr", "/v1/models/demo-cxr"])
def test_head_is_get_without_the_body(client: TestClient, path: str) -> None:
    head, get = client.head(path), client.get(path)
    assert (head.status_code, head.content) == (get.status_code, b"") and get.content
    assert head.headers["content-length"] == str(len(get.content))
    assert {k: v for k, v in head.headers.items() if k not in _PER_ANSWER} == {
        k: v for k, v in get.headers.items() if k not in _PER_ANSWER}


def test_head_where_there_is_no_get(client: TestClient) -> None:
    r = client.head("/explain")
    assert (r.status_code, r.headers["allow"], r.content) == (405, "POST", b"")
    assert client.head("/no-such-path").status_code == 404


def test_metrics_count_head_as_head(client: TestClient) -> None:
    client.head("/healthz")
    assert any(line.startswith('medexplain_http_requests_total{code="200",handler="/healthz",'
                               'method="HEAD"') for line in client.get("/metrics").text.splitlines())


def test_a_real_server_keeps_the_connection_after_a_head() -> None:
    """uvicorn sends no body bytes for HEAD: the next answer on the connection starts
    right after the head's blank line."""
    with live_server() as live, live.connect() as s:
        s.sendall(request_head("HEAD", "/models", {}) + request_head("GET", "/healthz", {}))
        data = b""
        while not data.endswith(b'{"status":"ok"}'):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    first, second = data.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 200 ") and b"content-length: " in first.lower()
    assert second.startswith(b"HTTP/1.1 200 "), data
