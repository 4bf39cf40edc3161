"""A real server and Debian's Chromium, driven by Playwright, for the web demo's tests.

The server is the service's own CLI in a subprocess on a free loopback port, serving a
model repository made for the tests: the bundled demo model, a copy of it under another
name, and an ensemble of the two. Every page is opened in a fresh browser context that
records each request it makes, refuses any that would leave the server's origin, and
fails the test for anything the service's content security policy refused.
Screenshots go to the pytest temporary directory (``web-screenshots``), never the tree.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Route, sync_playwright
from playwright.sync_api import Page as BrowserPage

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (scripts/system-deps.sh)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


API_KEY = "web-demo-test-key-0123"  # the keyed server's (at least 16 characters)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    headers: dict[str, str] = field(default_factory=dict)

    def explain(self, data: bytes, filename: str, **fields: str) -> httpx.Response:
        """The same request the page makes, from Python: what the page must agree with."""
        return httpx.post(f"{self.url}/explain", files={"file": (filename, data)},
                          data=fields, headers=self.headers, timeout=60)


def _repository(root: Path) -> Path:
    for name in ("demo-cxr", "demo-cxr-copy"):
        folder = root / name
        shutil.copytree(ROOT / "models" / "demo-cxr", folder)
        toml = folder / "model.toml"
        toml.write_text(toml.read_text().replace('name = "demo-cxr"', f'name = "{name}"'))
    (root / "demo-ensemble").mkdir()
    (root / "demo-ensemble" / "ensemble.toml").write_text(
        'members = ["demo-cxr", "demo-cxr-copy"]\ndescription = "Two copies of the synthetic '
        'phantom demo model; not for diagnosis."\n')
    return root


def start_server(models: Path, **env: str) -> Server:
    """The service's CLI on a free loopback port (not yet ready: see :func:`wait_ready`)."""
    port = _free_port()
    # A file, as a pipe nobody reads would block a chatty server; stop_server closes it.
    log = tempfile.TemporaryFile()  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port",
         str(port), "--models", str(models)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MEDEXPLAIN_THREADS": "1",
             "MEDEXPLAIN_DEFAULT_MODEL": "demo-cxr", **env})
    headers = {"X-API-Key": env["MEDEXPLAIN_API_KEYS"]} if "MEDEXPLAIN_API_KEYS" in env else {}
    return Server(f"http://127.0.0.1:{port}", process, log, headers)


def wait_ready(server: Server, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            server.log.seek(0)
            raise RuntimeError(f"the server exited: {server.log.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not become ready in {timeout:.0f} s")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    server.log.close()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """Two servers started together: one open, over a repository with an ensemble; one
    that requires an API key, over the bundled models."""
    models = _repository(tmp_path_factory.mktemp("web-models"))
    started = [start_server(models), start_server(ROOT / "models", MEDEXPLAIN_API_KEYS=API_KEY)]
    try:
        for s in started:
            wait_ready(s)
        yield started[0], started[1]
    finally:
        for s in started:
            stop_server(s)


@pytest.fixture(scope="session")
def server(servers: tuple[Server, Server]) -> Server:
    return servers[0]


@pytest.fixture(scope="session")
def keyed_server(servers: tuple[Server, Server]) -> Server:
    return servers[1]


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/system-deps.sh (Debian's chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("web-screenshots", numbered=False)


@dataclass
class Page:
    """A loaded demo page and every request it made."""

    page: BrowserPage
    origin: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # uncaught exceptions

    def api_requests(self) -> list[str]:
        return [r for r in self.requests if not r.split(" ", 1)[1].startswith(
            f"{self.origin}/static/")]


def guard_origin(ctx: BrowserContext, server: Server) -> list[str]:
    """Refuse, in ``ctx``, every request that would leave ``server``'s origin, and record
    what the content security policy refuses in ``window.__refused``. Returns the list the
    refused requests' URLs are appended to."""
    left: list[str] = []

    def guard(route: Route) -> None:
        url = route.request.url
        if url.startswith((f"{server.url}/", "blob:", "data:")):
            route.fallback()
        else:
            left.append(url)
            route.abort()

    ctx.route("**/*", guard)
    ctx.add_init_script("window.__refused = []; document.addEventListener("
                        "'securitypolicyviolation', (e) => window.__refused.push("
                        "`${e.violatedDirective} ${e.blockedURI}`));")
    return left


@contextmanager
def open_page(browser: Browser, server: Server, *, ready: bool = True) -> Iterator[Page]:
    """The demo page in a fresh context; with ``ready``, once the models are listed."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800},  # a laptop screen
                              accept_downloads=True)
    left = guard_origin(ctx, server)
    page = ctx.new_page()
    loaded = Page(page, server.url)
    page.on("request", lambda r: loaded.requests.append(f"{r.method} {r.url}"))
    page.on("pageerror", lambda e: loaded.errors.append(str(e)))
    document = page.goto(f"{server.url}/")
    assert document is not None and "default-src 'none'" in document.headers[
        "content-security-policy"]  # the service's own policy is what the page runs under
    if ready:
        page.wait_for_selector("#method-list input")
    try:
        yield loaded
        refused = page.evaluate("window.__refused")
    finally:
        ctx.close()
    assert not refused, f"the content security policy refused {refused}"
    assert not loaded.errors, f"uncaught errors on the page: {loaded.errors}"
    assert not left, f"requests left the origin: {left}"
    assert all(r.split(" ", 1)[1].startswith((f"{server.url}/", "blob:", "data:"))
               for r in loaded.requests), loaded.requests


@pytest.fixture
def demo(browser: Browser, server: Server) -> Iterator[Page]:
    with open_page(browser, server) as page:
        yield page
