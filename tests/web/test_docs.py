"""The API documentation pages render in a real browser with nothing fetched from elsewhere.

Swagger UI and ReDoc are served by the service itself (no CDN): a page that loads but
cannot reach its script stays blank, so the test waits for what the scripts draw — the
operations of the service's own OpenAPI document — while every request that would leave
the server's origin is refused and recorded.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import Browser

from tests.web.conftest import Server, guard_origin


@pytest.mark.parametrize(("path", "drawn"), [
    # Swagger UI draws one block per operation; ReDoc one menu entry per operation.
    ("/docs", ".swagger-ui .opblock"),
    ("/redoc", "[data-item-id^='tag/'], li[data-item-id]"),
])
def test_docs_render_offline(browser: Browser, server: Server, path: str, drawn: str) -> None:
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    left = guard_origin(ctx, server)
    seen: list[str] = []
    page = ctx.new_page()
    page.on("request", lambda r: seen.append(r.url))
    try:
        page.goto(f"{server.url}{path}")
        page.wait_for_selector(drawn, timeout=30_000)
        text = page.inner_text("body")
        refused = page.evaluate("window.__refused")
    finally:
        ctx.close()
    assert not left, f"requests left the origin: {left}"
    # The page's policy refuses only ReDoc's link to its vendor's logo, never a script.
    assert all(r.startswith("img-src https://cdn.redoc.ly/") for r in refused), refused
    assert f"{server.url}/openapi.json" in seen  # the document came from the service
    # The service's own operations are on the page, drawn by the script.
    for words in ("/explain", "/predict", "/v2/models/{name}/infer"):
        assert words in text, f"{words!r} is not on {path}"
