"""The web demo's timings in a real browser: from choosing a file to every map drawn.

    .venv/bin/python tools/bench_web.py [--rounds 5] [--threads 2] [--markdown]
        [--screenshot docs/web-demo.png]

What it measures: the page at ``GET /`` of a ``medexplain serve`` process on 127.0.0.1
(bundled models), in Debian's Chromium (headless, driven by Playwright, 1280×800), for each
case: the DICOM phantom ``tests/data/dicom/phantom_nodule.dcm`` (256×256) and a 3000×3000
8-bit PNG of pydicom-data's computed radiograph ``RG1_UNCR.dcm`` (windowed and resized in
memory by ``tools/bench_http.py``'s ``demo_png``), each with the page's default methods
(Grad-CAM and CRM) and with all six. Per upload, the page's own numbers
(``#results[data-timings]``): *answered* (file chosen → the JSON answer read), *drawn*
(→ every canvas drawn, maps decoded and composited over the service's preview of the
image), *sharp* (→ drawn again over the browser's own decode of a PNG/JPEG upload; for a
DICOM, the same as drawn), bytes sent (the file) and received
(Resource Timing's ``encodedBodySize`` of the /explain answer); the service's
``timings_ms.total``; and the page's JavaScript heap after drawing (CDP
``Performance.getMetrics`` ``JSHeapUsedSize``, after a forced garbage collection); and
the bytes of loading the page itself.

How it is run: one page per case, one untimed warm-up upload each; then every round uploads
once per case, the order of the cases rotated every round. Medians over the rounds. A
benchmark, not a test: it asserts nothing about the numbers.

``--screenshot PATH`` also writes the README's picture: the all-findings phantom with the
default methods, the whole page.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.bench_http import demo_png, machine, radiograph_path

CHROMIUM = "/usr/bin/chromium"
ALL_METHODS = ("crm", "crm_combined", "gradcam", "guided_backprop", "guided_gradcam",
               "fixations")


@dataclass(frozen=True)
class Case:
    name: str
    filename: str
    mime: str
    data: bytes
    methods: tuple[str, ...] | None  # None: the page's defaults


def cases() -> list[Case]:
    phantom = (ROOT / "tests" / "data" / "dicom" / "phantom_nodule.dcm").read_bytes()
    big = demo_png(radiograph_path(), (3000, 3000))
    return [
        Case("DICOM phantom 256², Grad-CAM + CRM", "phantom_nodule.dcm", "application/dicom",
             phantom, None),
        Case("PNG 3000², Grad-CAM + CRM", "rg1-3000.png", "image/png", big, None),
        Case("DICOM phantom 256², all six methods", "phantom_nodule.dcm", "application/dicom",
             phantom, ALL_METHODS),
        Case("PNG 3000², all six methods", "rg1-3000.png", "image/png", big, ALL_METHODS),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(threads: int, log: Any) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDEXPLAIN_")}
    env.update(PYTHONPATH=str(ROOT), MEDEXPLAIN_THREADS=str(threads))
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host",
                                "127.0.0.1", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit("the server exited before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return process, url
        except OSError:
            pass
        time.sleep(0.2)
    process.terminate()
    sys.exit("the server was not ready in 180 s")


def open_page(browser: Any, url: str, case: Case) -> tuple[Any, Any]:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(f"{url}/")
    page.wait_for_selector("#method-list input")
    if case.methods is not None:
        for box in page.query_selector_all("#method-list input"):
            box.set_checked(box.get_attribute("value") in case.methods)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")
    return page, cdp


def upload(page: Any, cdp: Any, case: Case) -> dict[str, float]:
    page.set_input_files("#file", {"name": case.filename, "mimeType": case.mime,
                                   "buffer": case.data})
    page.wait_for_function("() => document.getElementById('status-text').textContent"
                           ".startsWith('Explained')", timeout=120_000)
    if case.mime != "application/dicom":  # the browser's own decode replaces the preview
        page.wait_for_function("() => JSON.parse(document.getElementById('results')"
                               ".dataset.timings).sharp_ms > 0", timeout=120_000)
    numbers = json.loads(page.get_attribute("#results", "data-timings"))
    numbers.setdefault("sharp_ms", numbers["drawn_ms"])
    cdp.send("HeapProfiler.collectGarbage")
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    numbers["heap_mb"] = metrics["JSHeapUsedSize"] / 1e6
    return numbers


def save_picture(png: bytes, path: Path) -> None:
    """A screenshot as a 256-colour PNG: half the bytes, and a README picture needs no more."""
    import io

    from PIL import Image

    picture = Image.open(io.BytesIO(png)).convert("RGB")
    picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                     dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)


def run(rounds: int, threads: int,
        screenshot: Path | None) -> tuple[list[dict[str, Any]], str, list[int]]:
    from playwright.sync_api import sync_playwright

    work = cases()
    with tempfile.TemporaryFile() as log, sync_playwright() as p:
        process, url = serve(threads, log)
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            version = browser.version
            pages = [open_page(browser, url, case) for case in work]
            loaded = pages[0][0].evaluate("""() => {
              const entries = [...performance.getEntriesByType('navigation'),
                               ...performance.getEntriesByType('resource')];
              return [entries.length, entries.reduce((n, e) => n + e.encodedBodySize, 0)]; }""")
            for (page, cdp), case in zip(pages, work):
                upload(page, cdp, case)  # warm-up
            samples: dict[str, list[dict[str, float]]] = {c.name: [] for c in work}
            for r in range(rounds):
                order = list(range(len(work)))
                order = order[r % len(order):] + order[:r % len(order)]
                for i in order:
                    page, cdp = pages[i]
                    samples[work[i].name].append(upload(page, cdp, work[i]))
            if screenshot is not None:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(f"{url}/")
                page.wait_for_selector("#method-list input")
                page.set_input_files("#file", str(ROOT / "tests/data/phantoms/all-findings.png"))
                page.wait_for_function("() => document.getElementById('status-text').textContent"
                                       ".startsWith('Explained')")
                save_picture(page.screenshot(full_page=True), screenshot)
            browser.close()
        finally:
            process.terminate()
            process.wait(timeout=30)
    keys = ("answered_ms", "drawn_ms", "sharp_ms", "service_ms", "sent_bytes", "received_bytes",
            "heap_mb")
    rows = [{"case": case.name, "rounds": len(samples[case.name]),
             **{k: statistics.median(s[k] for s in samples[case.name]) for k in keys}}
            for case in work]
    return rows, version, loaded


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | answered ms | drawn ms | sharp ms | service ms | sent | received | JS heap |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['answered_ms']:.0f} | {r['drawn_ms']:.0f} | "
                     f"{r['sharp_ms']:.0f} | "
                     f"{r['service_ms']:.0f} | {r['sent_bytes'] / 1e3:,.0f} kB | "
                     f"{r['received_bytes'] / 1e3:,.0f} kB | {r['heap_mb']:.1f} MB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="MEDEXPLAIN_THREADS")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--screenshot", type=Path, help="write the README's picture here")
    args = parser.parse_args(argv)
    before = os.getloadavg()[0]
    rows, chromium, (requests, page_bytes) = run(args.rounds, args.threads, args.screenshot)
    after = os.getloadavg()[0]
    info = machine()
    print(f"Machine: {info['cpu']}, nproc {info['nproc']}; Python {info['python']}, "
          f"onnxruntime {info['onnxruntime']}, numpy {info['numpy']}, Chromium {chromium}")
    print(f"Command: `{shlex.join(['python', 'tools/bench_web.py', *(argv or sys.argv[1:])])}`"
          f"; MEDEXPLAIN_THREADS={args.threads}; load average {before:.1f} before, "
          f"{after:.1f} after (the other work on the machine)")
    print(f"The page itself: {page_bytes / 1e3:.1f} kB in {requests} requests (the document, "
          "its style sheet, modules and icon, GET /models and /models/{name}).")
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
