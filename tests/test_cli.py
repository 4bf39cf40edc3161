"""The medexplain command: ``explain`` with no server writes what POST /explain answers,
``--version``, and help text with no markup."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from service import __version__
from service.cli import main
from service.config import Settings
from service.main import create_app

ROOT = Path(__file__).resolve().parents[1]
DICOM = ROOT / "tests" / "data" / "dicom" / "phantom_nodule.dcm"
PNG = ROOT / "tests" / "data" / "phantoms" / "nodule_pneumothorax.png"


def _medexplain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "MEDEXPLAIN_THREADS": "1",
                               "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(threads=1))) as c:
        yield c


def _without_timings(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "timings_ms"}


def test_explain_writes_the_http_answer(tmp_path: Path, http: TestClient) -> None:
    done = _medexplain("explain", str(DICOM), "--methods", "gradcam,crm", "--classes",
                       "Nodule", "--dicom", "sc", "--dicom", "sr", "--dicom", "gsps",
                       "--dicom", "seg", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    names = ["explanation.json", "01-gradcam-Nodule.png", "02-crm-Nodule.png", "sc-01.dcm",
             "sc-02.dcm", "sr.dcm", "gsps.dcm", "seg.dcm"]
    assert done.stdout.split() == [str(tmp_path / n) for n in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)

    params = {"methods": "gradcam,crm", "classes": "Nodule"}
    headers = {"content-type": "application/dicom"}
    answer = http.post("/explain", content=DICOM.read_bytes(), params=params,
                       headers=headers).json()
    written = json.loads((tmp_path / "explanation.json").read_text())
    assert _without_timings(written) == _without_timings(answer)
    for name, item in zip(names[1:3], answer["explanations"], strict=True):
        assert (tmp_path / name).read_bytes() == base64.b64decode(item["heatmap"]["data"])

    # DICOM objects carry new UIDs and times on every run: compare everything else.
    captures = http.post("/explain", content=DICOM.read_bytes(), params=params,
                         headers={**headers,
                                  "accept": 'multipart/related; type="application/dicom"'})
    parts = _parts(captures.content, captures.headers["content-type"])
    for name, part in zip(["sc-01.dcm", "sc-02.dcm"], parts, strict=True):
        mine, theirs = pydicom.dcmread(tmp_path / name), pydicom.dcmread(_bytes(part))
        np.testing.assert_array_equal(mine.pixel_array, theirs.pixel_array)
        assert _stable(mine) == _stable(theirs)
    for one in ("sr", "gsps", "seg"):
        answer = http.post("/explain", content=DICOM.read_bytes(), headers={
            **headers, "accept": "application/dicom"}, params={**params, "dicom": one})
        mine, theirs = pydicom.dcmread(tmp_path / f"{one}.dcm"), pydicom.dcmread(
            _bytes(answer.content))
        assert _stable(mine) == _stable(theirs), one
        if one == "seg":
            np.testing.assert_array_equal(mine.pixel_array, theirs.pixel_array)


def test_explain_writes_captures_in_the_transfer_syntax_asked(tmp_path: Path) -> None:
    args = ["explain", str(DICOM), "--methods", "gradcam", "--classes", "Nodule", "--dicom",
            "sc", "--dicom", "sr"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--transfer-syntax", JPEGLSLossless, "--out", str(tmp_path / "ls")]) == 0
    plain, packed = (pydicom.dcmread(tmp_path / d / "sc.dcm") for d in ("plain", "ls"))
    assert plain.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert packed.file_meta.TransferSyntaxUID == JPEGLSLossless
    np.testing.assert_array_equal(packed.pixel_array, plain.pixel_array)
    # The report has no pixels to compress.
    assert pydicom.dcmread(tmp_path / "ls" / "sr.dcm").file_meta.TransferSyntaxUID == \
        ExplicitVRLittleEndian
    with pytest.raises(SystemExit):  # argparse's exit 2 for a syntax it does not offer
        main([*args, "--transfer-syntax", "1.2.840.10008.1.2", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_explain_several_files_each_into_its_own_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One model load for every file; each answer what the file alone gets; a file that
    gets none is said on stderr, the others are still written, and the exit status is 2."""
    args = ["--methods", "gradcam", "--classes", "Nodule"]
    assert main(["explain", str(DICOM), *args, "--out", str(tmp_path / "one")]) == 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a whole PNG")
    capsys.readouterr()
    assert main(["explain", str(DICOM), str(PNG), str(broken), str(DICOM), *args,
                 "--out", str(tmp_path / "all")]) == 2
    said = capsys.readouterr()
    assert "broken.png" in said.err
    folders = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert folders == sorted([DICOM.stem, PNG.stem, f"{DICOM.stem}-2"])
    alone = json.loads((tmp_path / "one" / "explanation.json").read_text())
    for name in (DICOM.stem, f"{DICOM.stem}-2"):
        written = json.loads((tmp_path / "all" / name / "explanation.json").read_text())
        assert _without_timings(written) == _without_timings(alone)
        assert (tmp_path / "all" / name / "01-gradcam-Nodule.png").read_bytes() == \
            (tmp_path / "one" / "01-gradcam-Nodule.png").read_bytes()
    assert (tmp_path / "all" / PNG.stem / "explanation.json").exists()
    assert str(tmp_path / "all" / PNG.stem / "explanation.json") in said.out.split()


def _bytes(data: bytes) -> Any:
    import io
    return io.BytesIO(data)


def _parts(body: bytes, content_type: str) -> list[bytes]:
    boundary = re.search(r"boundary=([^;]+)", content_type)
    assert boundary is not None
    chunks = body.split(b"--" + boundary.group(1).encode())[1:-1]
    return [c.split(b"\r\n\r\n", 1)[1][:-2] for c in chunks]


def _stable(dataset: pydicom.Dataset) -> list[tuple[str, str]]:
    """Every element but UIDs, dates and times, nested sequences included."""
    out = []
    for element in dataset.iterall():
        if element.VR in ("UI", "DA", "TM", "DT", "SQ") or element.tag == 0x7FE00010:
            continue
        out.append((element.keyword or str(element.tag), str(element.value)))
    return out


def test_explain_png_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In this process: the command is the same function, without another interpreter start.
    assert main(["explain", str(PNG), "--methods", "gradcam", "--heatmap", "npy",
                 "--out", str(tmp_path)]) == 0
    answer = json.loads((tmp_path / "explanation.json").read_text())
    assert answer["explanations"]
    for number, item in enumerate(answer["explanations"], start=1):
        saved = np.load(tmp_path / f"{number:02d}-gradcam-{item['label'].replace(' ', '_')}.npy")
        np.testing.assert_array_equal(saved, np.load(_bytes(base64.b64decode(
            item["heatmap"]["data"]))))
    capsys.readouterr()
    assert main(["explain", str(PNG), "--dicom", "sc", "--out", str(tmp_path / "x")]) == 2
    assert "dicom sc needs a DICOM upload" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["explain", str(PNG), "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing.png")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_version() -> None:
    done = _medexplain("--version")
    assert (done.returncode, done.stdout) == (0, f"medexplain {__version__}\n")


@pytest.mark.parametrize("command", [[], ["serve"], ["explain"], ["compile"], ["openapi"]],
                         ids=["main", "serve", "explain", "compile", "openapi"])
def test_help_has_no_markup(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: medexplain")
    assert "``" not in text and ":func:" not in text
