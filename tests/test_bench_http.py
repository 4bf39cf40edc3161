"""The pure parts of tools/bench_http.py: payloads, parsing, medians and the table."""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools import bench_http as bench

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("chosen", ["json", "dicom"])
def test_requests_start_with_predict_and_have_unique_names(chosen: str) -> None:
    requests = bench.REQUEST_SETS[chosen]
    names = [r.name for r in requests]
    assert names[0] == "predict" and requests[0].path == "/predict"
    assert len(set(names)) == len(names)
    assert {r.body for r in requests} <= {"dicom", "demo_png"}


def test_dicom_requests_ask_for_every_transfer_syntax_the_service_writes() -> None:
    from service.api.negotiation import negotiate
    from service.outputs.transfer_syntax import TRANSFER_SYNTAXES

    asked = [negotiate(r.accept)[0] for r in bench.DICOM_REQUESTS[1:]]
    assert {o.transfer_syntax.uid for o in asked} == set(TRANSFER_SYNTAXES)
    assert {o.packaging.name for o in asked} == {"DICOM", "MULTIPART"}


def test_target_keeps_commas() -> None:
    req = bench.Request("x", "/explain", {"methods": "gradcam,crm", "classes": "0,1"})
    assert bench.target(req) == "/explain?methods=gradcam,crm&classes=0,1"
    assert bench.target(bench.Request("p", "/predict")) == "/predict"


def test_multipart_round_trips() -> None:
    body, header = bench.multipart({"methods": "gradcam", "heatmap": "overlay"}, "a.png",
                                   b"\x89PNG-bytes", "image/png", boundary="BOUNDARY")
    assert header == "multipart/form-data; boundary=BOUNDARY"
    assert body.startswith(b"--BOUNDARY\r\n") and body.endswith(b"--BOUNDARY--\r\n")
    assert b'name="methods"\r\n\r\ngradcam\r\n' in body
    assert b'name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n\x89PNG-bytes\r\n' \
        in body


def test_window_to_uint8_inverts_monochrome1() -> None:
    pixels = np.array([[0, 500, 1000, 2000]], dtype=np.uint16)
    plain = bench.window_to_uint8(pixels, 500.0, 1000.0, monochrome1=False)
    assert plain.dtype == np.uint8 and plain.tolist() == [[0, 128, 255, 255]]
    inverted = bench.window_to_uint8(pixels, 500.0, 1000.0, monochrome1=True)
    assert inverted.tolist() == [[255, 127, 0, 0]]
    assert bench.window_to_uint8(pixels, None, None, False).tolist() == [[0, 64, 128, 255]]


def test_demo_png_is_a_grey_image_of_the_asked_size() -> None:
    path = bench.radiograph_path()
    png = bench.demo_png(path, size=(70, 60))
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape == (60, 70) and image.dtype == np.uint8
    assert 0 < float(image.mean()) < 255


def test_timings_reads_json_and_tolerates_the_rest() -> None:
    body = b'{"timings_ms": {"decode": 2.5, "render": 7, "forward": 1.0}}'
    assert bench.timings(body, "application/json") == {"render": 7.0, "decode": 2.5,
                                                       "total": None}
    empty = {"render": None, "decode": None, "total": None}
    assert bench.timings(b"\x00DICM", "application/dicom") == empty
    assert bench.timings(b"not json", "application/json") == empty
    assert bench.timings(b"[1, 2]", "application/json") == empty


def test_parse_server() -> None:
    label, path = bench.parse_server(f"now={ROOT}")
    assert label == "now" and path == ROOT
    for bad in ("no-equals", "=x", f"x={ROOT / 'tools'}"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_server(bad)


def test_parse_args_defaults_to_this_checkout() -> None:
    args = bench.parse_args([])
    assert args.server == [("current", bench.ROOT)] and args.rounds == 7
    assert args.port_base == 8600 and args.threads == 2
    with pytest.raises(SystemExit):
        bench.parse_args([f"--server=a={ROOT}", f"--server=a={ROOT}"])


def test_rotated() -> None:
    items = [bench.Server(c, ROOT, 0) for c in "abc"]
    assert [s.label for s in bench.rotated(items, 0)] == ["a", "b", "c"]
    assert [s.label for s in bench.rotated(items, 4)] == ["b", "c", "a"]
    assert bench.rotated([], 3) == []


def _sample(server: str, request: str, round_: int, wall: float, status: int = 200,
            render: float | None = None) -> bench.Sample:
    return bench.Sample(server, request, round_, status, wall, 100, render_ms=render)


def test_summarize_and_table() -> None:
    samples = [
        _sample("a", "predict", 0, 10.0), _sample("a", "predict", 1, 30.0),
        _sample("a", "predict", 2, 20.0),
        _sample("a", "explain", 0, 50.0, render=5.0), _sample("a", "explain", 1, 70.0),
        _sample("a", "explain", 2, 60.0, render=7.0),
        _sample("b", "predict", 0, 40.0),
        bench.Sample("b", "explain", 0, 422, 3.0, 30, error='{"title":"Unknown label"}'),
    ]
    rows = bench.summarize(samples, ["a", "b"], ["predict", "explain"])
    by = {(r["server"], r["request"]): r for r in rows}
    assert by["a", "predict"]["wall_ms"] == 20.0 and by["a", "predict"]["ratio_to_predict"] == 1
    assert by["a", "explain"]["wall_ms"] == 60.0
    assert by["a", "explain"]["ratio_to_predict"] == pytest.approx(3.0)
    assert by["a", "explain"]["render_ms"] == 6.0 and by["a", "explain"]["decode_ms"] is None
    assert by["b", "explain"]["n"] == 0 and by["b", "explain"]["wall_ms"] is None
    assert by["b", "explain"]["errors"] == [{"round": 0, "status": 422,
                                            "body": '{"title":"Unknown label"}'}]
    table = bench.markdown_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| request | server | wall ms | ÷ predict | render ms | bytes |"
    assert "| explain | a | 60 | 3.0 | 6 | 100 |" in lines
    assert "| explain | b | HTTP 422 | – | – | – |" in lines
    assert '- b / explain (round 0): HTTP 422: {"title":"Unknown label"}' in lines
    again = samples + [bench.Sample("b", "explain", 1, 422, 3.0, 30,
                                    error='{"title":"Unknown label"}')]
    table = bench.markdown_table(bench.summarize(again, ["a", "b"], ["predict", "explain"]))
    assert '- b / explain (rounds 0, 1): HTTP 422: {"title":"Unknown label"}' in table.splitlines()
