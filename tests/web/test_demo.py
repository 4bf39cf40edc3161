"""The web demo in a real browser: uploads, drawn pixels, sliders, errors, keyboard.

Every expectation comes from the service itself (the same request made from Python) or
from the image files, never from the page: boxes must equal the service's regions at the
same threshold, drawn pixels the map composited over the image in NumPy.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
from playwright.sync_api import Browser, Route
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page as BrowserPage

from service.outputs.render import _JET_RGB, ALPHA
from tests.imaging.exif import jpeg_with_exif, orientation_tiff
from tests.web.conftest import API_KEY, DATA, Page, Server, open_page

PHANTOM_DCM = DATA / "dicom" / "phantom_nodule.dcm"
NODULE_PNG = DATA / "phantoms" / "nodule.png"
PNEUMOTHORAX_PNG = DATA / "phantoms" / "pneumothorax.png"
LABELS = ["Cardiomegaly", "Nodule", "Pleural Effusion", "Pneumothorax"]
PALETTE = {"Cardiomegaly": (0xE6, 0x9F, 0x00), "Nodule": (0x56, 0xB4, 0xE9)}


# ------------------------------------------------------------------------------ helpers

def upload(demo: Page, path: Path | None = None, *, name: str = "", data: bytes = b"",
           mime: str = "application/octet-stream", wait: bool = True) -> None:
    files = path if path is not None else {"name": name, "mimeType": mime, "buffer": data}
    demo.page.set_input_files("#file", files)
    if wait:
        demo.page.wait_for_selector("#results:not([hidden])", timeout=30_000)


def canvas(demo: Page, element_id: str) -> np.ndarray:
    """A canvas's pixels as (H, W, 3) uint8 RGB, read back losslessly."""
    url = demo.page.evaluate(f"document.getElementById('{element_id}').toDataURL('image/png')")
    rgba = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8),
                        cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(rgba, cv2.COLOR_BGRA2RGB)


def cards(demo: Page) -> dict[tuple[str, str], list[list[int]]]:
    """(method, label) → the boxes each card draws."""
    found = demo.page.eval_on_selector_all(
        ".card", "els => els.map(e => [e.dataset.method, e.dataset.label, e.dataset.regions])")
    return {(method, label): json.loads(boxes) for method, label, boxes in found}


def served_boxes(server: Server, path: Path, **fields: str) -> dict[tuple[str, str], list]:
    body = server.explain(path.read_bytes(), path.name, **fields).json()
    return {(e["method"], e["label"] or ""): [r["box"] for r in e["regions"]]
            for e in body["explanations"]}


def served_maps(server: Server, path: Path, **fields: str) -> dict[tuple[str, str], np.ndarray]:
    body = server.explain(path.read_bytes(), path.name, heatmap="npy", **fields).json()
    return {(e["method"], e["label"] or ""): np.load(io.BytesIO(base64.b64decode(
        e["heatmap"]["data"]))) for e in body["explanations"]}


def press(demo: Page, selector: str, key: str, times: int = 1) -> None:
    """Keys on a control, then wait until the page has drawn for the sliders' new values."""
    demo.page.focus(selector)
    for _ in range(times):
        demo.page.keyboard.press(key)
    demo.page.wait_for_function("""() => document.getElementById('results').dataset.drawn
        === JSON.stringify(['score-threshold', 'region-threshold', 'opacity']
                           .map(id => Number(document.getElementById(id).value)))""")


def held_until(page: BrowserPage, held: list[Route], count: int) -> None:
    """Wait (route handlers run while Playwright is called) until ``count`` are held."""
    for _ in range(500):
        if len(held) >= count:
            break
        page.wait_for_timeout(20)
    assert len(held) == count


def box_mask(shape: tuple[int, int], boxes: list[list[int]], scale: float, margin: int,
             label: tuple[int, int] = (0, 0)) -> np.ndarray:
    """True on and around the drawn outlines, and on a label strip (height, width) above
    each box's top-left corner."""
    mask = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        a, b, c, d = (round(v * scale) for v in (x0, y0, x1, y1))
        mask[max(0, b - margin):d + margin, max(0, a - margin):c + margin] = True
        mask[b + margin:d - margin, a + margin:c - margin] = False
        mask[max(0, b - margin - label[0]):b + margin, max(0, a - margin):a + label[1]] = True
    return mask


def near_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: float = 40) -> np.ndarray:
    return np.linalg.norm(pixels.astype(float) - np.array(rgb, float), axis=-1) < tolerance


def edge_has_colour(pixels: np.ndarray, box: list[int], scale: float,
                    rgb: tuple[int, int, int]) -> bool:
    """Whether the box's left edge (its middle half) is drawn in the colour."""
    x0, y0, _, y1 = (v * scale for v in box)
    band = pixels[int(y0 + (y1 - y0) / 4):int(y1 - (y1 - y0) / 4),
                  max(0, int(x0) - 1):int(x0) + 3]
    return bool(near_colour(band, rgb).any(axis=1).all())


# ------------------------------------------------------------------------------ tests

def test_dicom_phantom_is_explained_and_drawn(demo: Page, server: Server,
                                              screenshots: Path) -> None:
    upload(demo, PHANTOM_DCM)
    page = demo.page
    header = page.inner_text("#header")
    assert "DX" in header and "Explicit VR Little Endian" in header and "256 × 256" in header
    text = page.inner_text("body")
    dataset = pydicom.dcmread(PHANTOM_DCM)
    for secret in (str(dataset.PatientName), str(dataset.PatientID)):
        assert secret not in text and secret not in page.content()

    fields = {"methods": "crm,gradcam", "region_threshold": "0.5"}
    assert cards(demo) == served_boxes(server, PHANTOM_DCM, **fields)
    assert page.inner_text("#overlay-caption") == "CRM — Nodule · score 0.9999"

    # The overlay is the service's map composited over the image, as NumPy does it.
    maps = served_maps(server, PHANTOM_DCM, **fields)
    preview = server.explain(PHANTOM_DCM.read_bytes(), "x.dcm", preview="true").json()["preview"]
    grey = cv2.imdecode(np.frombuffer(base64.b64decode(preview["data"]), np.uint8), 0)
    drawn = canvas(demo, "view-overlay")
    h, w = drawn.shape[:2]
    crm = maps[("crm", "Nodule")]
    level = np.round(crm / crm.max() * 255).astype(np.uint8)
    # The map's layer (JET, alpha = strength) stretched bilinearly with premultiplied
    # alpha, as a canvas stretches it, then blended at the opacity over the image.
    alpha = level.astype(np.float32) / 255
    tinted = _JET_RGB[:, 0][level].astype(np.float32) * alpha[..., None]
    stretch = lambda a: cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)
    weight = ALPHA * stretch(alpha)[..., None]
    backdrop = stretch(grey.astype(np.float32))[..., None]
    expected = backdrop * (1 - weight) + ALPHA * stretch(tinted)
    away = ~box_mask((h, w), cards(demo)[("crm", "Nodule")], w / 256, 6, label=(18, 150))
    error = np.abs(drawn.astype(float) - expected)[away]
    assert error.mean() < 2.5 and np.percentile(error, 99) < 12, (error.mean(), error.max())
    inside = drawn[int(h * 0.5), int(w * 0.18)]  # the nodule's centre: hot, not grey
    assert int(inside.max()) - int(inside.min()) > 60

    # The summary: the finding's box in its class colour, the rest of the image grey.
    summary = canvas(demo, "view-summary")
    box = cards(demo)[("crm", "Nodule")][0]
    assert edge_has_colour(summary, box, w / 256, PALETTE["Nodule"])
    outside = ~box_mask((h, w), [box], w / 256, 5, label=(20, 150))
    spread = summary.max(axis=2).astype(int) - summary.min(axis=2)
    assert (spread[outside] <= 2).all(), "colour outside the finding's box"
    assert page.inner_text("#legend") == "Nodule 0.9999 (1 region)"
    page.screenshot(path=str(screenshots / "dicom-phantom.png"), full_page=True)


def test_dicom_header_and_image_as_the_network_saw_it(demo: Page) -> None:
    """Compressed and MONOCHROME1 phantoms: named in the header, drawn as the PNG phantom
    they were made from (inverted back, decompressed)."""
    expected = cv2.imread(str(NODULE_PNG), cv2.IMREAD_GRAYSCALE)
    for name, syntax, photometric in (
            ("phantom_nodule_j2k.dcm", "JPEG 2000 Lossless (1.2.840.10008.1.2.4.90)",
             "MONOCHROME2"),
            ("phantom_nodule_mono1.dcm", "Explicit VR Little Endian (1.2.840.10008.1.2.1)",
             "MONOCHROME1")):
        upload(demo, DATA / "dicom" / name)
        rows = dict(demo.page.eval_on_selector_all(
            "#header dt", "dts => dts.map(dt => [dt.textContent, dt.nextElementSibling.textContent])"))
        assert rows["Transfer syntax"] == syntax and rows["Photometric"] == photometric, rows
        assert rows["Modality"] == "DX" and rows["Frame"] == "1 of 1"
        drawn = canvas(demo, "view-original")
        h, w = drawn.shape[:2]
        reference = cv2.resize(expected, (w, h), interpolation=cv2.INTER_LINEAR)
        assert np.abs(drawn[..., 0].astype(int) - reference).mean() < 2, name


def test_a_photo_taken_sideways_is_drawn_upright(demo: Page) -> None:
    """A JPEG stored a quarter turn anticlockwise with the EXIF orientation that turns it
    back (6), as a phone saves a photo taken sideways: the service explains the picture
    upright, so the browser's own decode of the file (which applies the orientation too)
    fills the view in the picture's proportions and lands on the maps."""
    upright = np.ascontiguousarray(cv2.imread(str(NODULE_PNG), cv2.IMREAD_GRAYSCALE)[:, 32:224])
    stored = np.ascontiguousarray(np.rot90(upright, 1))
    jpeg = cv2.imencode(".jpg", stored, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    upload(demo, name="sideways.jpg", data=jpeg_with_exif(jpeg, orientation_tiff(6)),
           mime="image/jpeg")
    demo.page.wait_for_selector("#results[data-timings*='sharp_ms']", timeout=30_000)
    drawn = canvas(demo, "view-original")
    h, w = drawn.shape[:2]
    assert abs(w / h - 192 / 256) < 0.02, (w, h)
    reference = cv2.resize(upright, (w, h), interpolation=cv2.INTER_LINEAR)
    assert np.abs(drawn[..., 0].astype(int) - reference).mean() < 3


def test_sliders_redraw_without_a_request(demo: Page, server: Server,
                                          screenshots: Path) -> None:
    page = demo.page
    page.check("#class-list input[value='0']")  # Cardiomegaly: scores 0.0013 here
    page.check("#class-list input[value='1']")
    upload(demo, NODULE_PNG)
    asked = len(demo.api_requests())
    fields = {"methods": "crm,gradcam", "classes": "0,1"}
    at_half = served_boxes(server, NODULE_PNG, region_threshold="0.5", **fields)
    assert cards(demo) == at_half

    # A class under the score threshold is marked, and left out of the summary.
    below = page.inner_text(".card[data-method=crm][data-label=Cardiomegaly] figcaption")
    assert "below score threshold (0.0013 < 0.50)" in below
    assert page.inner_text("#legend") == "Nodule 0.9999 (1 region)"
    w = page.eval_on_selector("#view-summary", "c => c.width")
    cardiomegaly = at_half[("crm", "Cardiomegaly")][0]
    assert not edge_has_colour(canvas(demo, "view-summary"), cardiomegaly, w / 256,
                               PALETTE["Cardiomegaly"])

    # Region threshold 0.50 → 0.30 by keyboard: every box is the service's at 0.30.
    press(demo, "#region-threshold", "ArrowLeft", 20)
    assert page.input_value("#region-threshold") == "0.3"
    at_030 = served_boxes(server, NODULE_PNG, region_threshold="0.3", **fields)
    assert at_030 != at_half
    assert cards(demo) == at_030
    overlay = page.eval_on_selector("#view-overlay", "c => JSON.parse(c.dataset.regions)")
    assert overlay == at_030[("crm", "Nodule")]

    # Score threshold to 0: Cardiomegaly becomes a finding, drawn in its colour; the
    # classes nobody explained are named.
    press(demo, "#score-threshold", "Home")
    legend = page.inner_text("#legend")
    assert "Cardiomegaly 0.0013" in legend and "Nodule 0.9999" in legend
    assert edge_has_colour(canvas(demo, "view-summary"), at_030[("crm", "Cardiomegaly")][0],
                           w / 256, PALETTE["Cardiomegaly"])
    assert "Pleural Effusion, Pneumothorax are at or above" in page.inner_text("#unexplained")

    # Opacity 0: the overlay is the image again, apart from the boxes.
    press(demo, "#opacity", "Home")
    overlay_pixels = canvas(demo, "view-overlay").astype(int)
    original = canvas(demo, "view-original").astype(int)
    away = ~box_mask(overlay_pixels.shape[:2], at_030[("crm", "Nodule")], w / 256, 6,
                     label=(18, 150))
    assert np.abs(overlay_pixels - original)[away].max() <= 1
    page.screenshot(path=str(screenshots / "sliders.png"), full_page=True)
    assert len(demo.api_requests()) == asked, demo.api_requests()[asked:]


def test_problem_details_are_shown(demo: Page, server: Server) -> None:
    page = demo.page
    upload(demo, NODULE_PNG)
    junk = b"these are notes, not an image\n" * 4
    upload(demo, name="notes.txt", data=junk, mime="text/plain", wait=False)
    page.wait_for_selector("#error:not([hidden])")
    problem = server.explain(junk, "notes.txt").json()
    assert page.inner_text("#error-detail") == problem["detail"]
    assert page.inner_text("#error-title") == problem["title"]
    assert problem["code"] in page.inner_text("#error-code")
    assert page.is_hidden("#results"), "the previous image's results are still shown"

    # A parameter the service refuses, from the Advanced fields: its detail, verbatim.
    page.click("#advanced summary")
    page.fill("#window", "bright")
    upload(demo, PHANTOM_DCM, wait=False)
    page.wait_for_function("() => !document.getElementById('error').hidden")
    refused = server.explain(PHANTOM_DCM.read_bytes(), PHANTOM_DCM.name, window="bright").json()
    assert page.inner_text("#error-detail") == refused["detail"]
    page.fill("#window", "")

    # No method ticked: nothing is sent and the page says why.
    for box in page.query_selector_all("#method-list input:checked"):
        box.uncheck()
    assert page.is_disabled("#go") and page.is_visible("#methods-hint")
    page.check("#method-list input[value=gradcam]")
    assert page.is_enabled("#go") and page.is_hidden("#methods-hint")


def test_progress_clears_old_results(demo: Page) -> None:
    page = demo.page
    upload(demo, NODULE_PNG)
    held: list[Route] = []
    page.route("**/explain", lambda route: held.append(route))
    upload(demo, PNEUMOTHORAX_PNG, wait=False)
    page.wait_for_function("() => !document.getElementById('progress').hidden")
    assert page.is_hidden("#results")
    assert page.inner_text("#status-text") == "Explaining pneumothorax.png…"
    held_until(page, held, 1)
    held[0].continue_()
    page.wait_for_selector("#results:not([hidden])")
    assert page.is_hidden("#progress")
    finding = page.inner_text("#scores tbody tr:not(.below)")
    assert finding.split("\t")[0].strip() == "Pneumothorax"

    # Cancelled while the service works: nothing stale, no error, ready for the next one.
    upload(demo, NODULE_PNG, wait=False)
    page.wait_for_function("() => !document.getElementById('cancel').hidden")
    held_until(page, held, 2)
    page.click("#cancel")
    page.wait_for_function("() => document.getElementById('progress').hidden")
    assert page.inner_text("#status-text") == "Cancelled."
    assert page.is_hidden("#results") and page.is_hidden("#error")
    with contextlib.suppress(PlaywrightError):  # the page has dropped the request already
        held[1].abort()


def test_keyboard_labels_and_layout(demo: Page, screenshots: Path) -> None:
    page = demo.page
    upload(demo, NODULE_PNG)
    unnamed = page.evaluate("""() => [...document.querySelectorAll(
        'input, select, button, summary, canvas[role=img]')].filter(el => {
          const name = (el.labels && [...el.labels].map(l => l.textContent).join(' ').trim())
            || el.getAttribute('aria-label') || (el.tagName !== 'INPUT' && el.textContent.trim());
          return !name; }).map(el => el.outerHTML.slice(0, 80))""")
    assert unnamed == []

    reached: list[str] = []
    page.focus("#model")
    while len(reached) < 100:  # once round the page
        reached.append(page.evaluate("""() => { const e = document.activeElement;
            return e.id || `${e.name || e.className}:${e.value || e.textContent.trim()}`; }"""))
        page.keyboard.press("Tab")
        if reached[-1] == "model" and len(reached) > 1:
            break
    for control in ["model", "file", "method:crm", "method:gradcam", "class:1",
                    "score-threshold", "region-threshold", "opacity", "summary-method", "go",
                    "dl-json"]:
        assert control in reached, (control, reached)
    assert sum(r.startswith("card-select") for r in reached) == 2
    for dicom_only in ("dl-sc", "dl-sr", "dl-gsps", "dl-seg"):
        assert dicom_only not in reached and page.is_disabled(f"#{dicom_only}")

    # A card chosen from the keyboard is shown large.
    page.focus(".card[data-method=gradcam] button")
    page.keyboard.press("Enter")
    assert page.get_attribute(".card[data-method=gradcam] button", "aria-pressed") == "true"
    assert page.inner_text("#overlay-caption") == "Grad-CAM — Nodule · score 0.9999"

    # Text contrast (WCAG AA: 4.5:1) against the nearest opaque background.
    ratios = page.evaluate("""() => {
      const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
      const lum = ([r, g, b]) => [r, g, b].map(v => { v /= 255;
        return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
        .reduce((a, v, i) => a + v * [0.2126, 0.7152, 0.0722][i], 0);
      const background = (el) => { for (; el; el = el.parentElement) {
        const c = rgb(getComputedStyle(el).backgroundColor);
        if (c.length < 4 || c[3] > 0) return c.slice(0, 3); } return [255, 255, 255]; };
      return [...document.querySelectorAll('body *')].filter(el => el.offsetParent
          && [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()))
        .map(el => { const a = lum(rgb(getComputedStyle(el).color)), b = lum(background(el));
          return [el.tagName + '#' + el.id + '.' + el.className,
                  (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)]; }); }""")
    low = [(what, round(r, 2)) for what, r in ratios if r < 4.5]
    assert ratios and not low, low

    for width in (1280, 1024):  # laptop screens: no sideways scrolling
        page.set_viewport_size({"width": width, "height": 760})
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(screenshots / "laptop-1024.png"), full_page=True)


def test_ensemble_members_are_shown(demo: Page, server: Server) -> None:
    page = demo.page
    page.select_option("#model", "demo-ensemble")
    page.wait_for_function("() => document.getElementById('members').textContent.includes('mean of')")
    assert "demo-cxr, demo-cxr-copy" in page.inner_text("#members")
    page.check("#method-list input[value=fixations]")
    upload(demo, NODULE_PNG)
    assert "demo-ensemble" in page.inner_text("#header")
    fields = {"model": "demo-ensemble", "methods": "crm,gradcam,fixations"}
    assert cards(demo) == served_boxes(server, NODULE_PNG, **fields)

    # The fixation points, in the class's colour, where the service put them.
    body = server.explain(NODULE_PNG.read_bytes(), NODULE_PNG.name, **fields).json()
    points = next(e["points"] for e in body["explanations"] if e["method"] == "fixations")
    page.focus(".card[data-method=fixations] button")
    page.keyboard.press("Enter")
    drawn = canvas(demo, "view-overlay")
    scale = drawn.shape[1] / 256
    centres = np.array([drawn[int((y + 0.5) * scale), int((x + 0.5) * scale)]
                        for x, y in points])
    assert len(points) > 10 and near_colour(centres, PALETTE["Nodule"]).mean() > 0.9


def test_downloads(demo: Page, server: Server) -> None:
    page = demo.page
    upload(demo, PHANTOM_DCM)
    with page.expect_download() as got:
        page.click("#dl-json")
    body = json.loads(Path(got.value.path()).read_text())
    assert [p["label"] for p in body["predictions"]] == LABELS
    scores = page.eval_on_selector_all("#scores tbody tr", "rows => rows.map(r => r.cells[1].textContent)")
    assert scores == [f"{p['score']:.4f}" if p["score"] >= 1e-3 else f"{p['score']:.1e}"
                      .replace("e-0", "e-") for p in body["predictions"]]

    press(demo, "#region-threshold", "ArrowLeft", 20)  # 0.30: the SR holds these boxes
    with page.expect_download() as got:
        page.click("#dl-sr")
    sr = pydicom.dcmread(got.value.path())
    source = pydicom.dcmread(PHANTOM_DCM)
    assert sr.Modality == "SR" and sr.StudyInstanceUID == source.StudyInstanceUID

    def polylines(items) -> int:  # type: ignore[no-untyped-def]
        return sum((getattr(i, "GraphicType", "") == "POLYLINE")
                   + polylines(getattr(i, "ContentSequence", [])) for i in items)

    assert polylines(sr.ContentSequence) == sum(len(b) for b in cards(demo).values())

    # The presentation state: the same regions, drawn over the source itself.
    with page.expect_download() as got:
        page.click("#dl-gsps")
    gsps = pydicom.dcmread(got.value.path())
    assert gsps.Modality == "PR" and gsps.StudyInstanceUID == source.StudyInstanceUID
    assert gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0] \
        .ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert got.value.suggested_filename == "phantom_nodule.gsps.dcm"
    assert sum(o.GraphicType == "POLYLINE" for a in gsps.GraphicAnnotationSequence
               for o in a.get("GraphicObjectSequence", [])) == sum(
        len(b) for b in cards(demo).values())
    with page.expect_download() as got:
        page.click("#dl-seg")
    seg = pydicom.dcmread(got.value.path())
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert len(seg.SegmentSequence) == len(cards(demo))
    assert got.value.suggested_filename == "phantom_nodule.seg.dcm"

    page.focus(".card[data-method=gradcam] button")
    page.keyboard.press("Enter")
    with page.expect_download() as got:
        page.click("#dl-sc")
    sc = pydicom.dcmread(got.value.path())
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert got.value.suggested_filename == "phantom_nodule.gradcam-Nodule.sc.dcm"


def test_api_key_clears_its_error(browser: Browser, keyed_server: Server) -> None:
    with open_page(browser, keyed_server, ready=False) as demo:
        page = demo.page
        page.wait_for_selector("#error:not([hidden])")
        assert "API key" in page.inner_text("#error-detail")
        assert page.evaluate("document.getElementById('advanced').open")
        page.fill("#key", API_KEY)
        page.keyboard.press("Enter")
        page.wait_for_selector("#method-list input")
        assert page.is_hidden("#error")
        upload(demo, NODULE_PNG)
        assert "Nodule" in page.inner_text("#legend")


def test_the_page_maths_is_the_services(demo: Page) -> None:
    """maps.js and draw.js against service/methods and OpenCV, on maps made here."""
    from service.methods.base import RawMap
    from service.methods.maps import normalise
    from service.methods.regions import map_regions, regions

    rng = np.random.default_rng(13)
    n = 128  # any grid: the steps do not depend on its size
    coarse = rng.random((8, 8), dtype=np.float32) ** 3
    cam = cv2.resize(coarse, (n, n), interpolation=cv2.INTER_LINEAR)
    gradient = rng.normal(size=(n, n)).astype(np.float32) * cam  # signed speckle
    got = demo.page.evaluate("""async ([n, cam, gradient]) => {
      const m = await import('/static/maps.js'), d = await import('/static/draw.js');
      const a = Float32Array.from(cam), g = Float32Array.from(gradient);
      const cut = (s) => [0.2, 0.5, 0.8].map(t => m.regions(s, n, n, t, 3000 / n, 2500 / n));
      return {
        jet: d.JET,
        smooth: Array.from(m.smooth(a, n, n, 3.62)),
        cam: cut(m.regionStrength('gradcam', a, n, n)),
        gradient: cut(m.regionStrength('guided_backprop', g, n, n)),
      }; }""", [n, cam.ravel().tolist(), gradient.ravel().tolist()])
    assert np.abs(np.array(got["jet"]) - _JET_RGB[:, 0].astype(int)).max() <= 1
    blurred = cv2.GaussianBlur(cam, (0, 0), sigmaX=3.62, sigmaY=3.62)
    assert np.abs(np.array(got["smooth"]).reshape(n, n) - blurred).max() < 1e-5 * blurred.max()
    for i, t in enumerate((0.2, 0.5, 0.8)):
        expected = [{"box": list(r.box), "score": r.score}
                    for r in regions(normalise(cam), t, 3000 / n, 2500 / n)]
        assert got["cam"][i] == expected, t
        served = map_regions(RawMap(gradient, 0, "model"), (n, n), (2500, 3000), t)
        assert got["gradient"][i] == [{"box": list(r.box), "score": r.score} for r in served], t
