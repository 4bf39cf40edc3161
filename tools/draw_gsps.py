"""Draw a Grayscale Softcopy Presentation State over its source image, for a look at what
a viewer would show (docs/gsps.png), without a PACS viewer.

    python tools/draw_gsps.py [--source RG1_UNCR.dcm] [--query methods=gradcam,fixations]
                              [--width 900] [--out docs/gsps.png]

The service (in process, the bundled model) answers ``dicom=gsps`` for the source; DCMTK's
``dcmp2pgm`` renders the source through the presentation state's Modality, VOI and
Presentation LUTs, as a viewer would; this script then draws each graphic layer's polylines,
points and legend text in the layer's recommended colour. The drawing is this script's,
not a viewer's: viewers draw the same objects in their own style.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl

import cv2
import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _source(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name, download=False)
    if found is None:
        sys.exit(f"{name}: no such file, nor in the installed pydicom-data")
    return Path(found)


def _presentation_state(source: Path, query: str) -> bytes:
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    with TestClient(create_app(Settings(models=ROOT / "models"))) as client:
        answer = client.post("/explain", content=source.read_bytes(),
                             params={**dict(parse_qsl(query)), "dicom": "gsps"},
                             headers={"content-type": "application/dicom",
                                      "accept": "application/dicom"})
    if answer.status_code != 200:
        sys.exit(f"/explain answered {answer.status_code}: {answer.text[:300]}")
    return answer.content


def _rendered(source: Path, gsps: bytes) -> np.ndarray:
    if shutil.which("dcmp2pgm") is None:
        sys.exit("dcmp2pgm (DCMTK) is not installed: `bash scripts/system-deps.sh`")
    with tempfile.TemporaryDirectory() as folder:
        state, picture = Path(folder) / "ps.dcm", Path(folder) / "out.pgm"
        state.write_bytes(gsps)
        subprocess.run(["dcmp2pgm", "-p", str(state), str(source), str(picture)], check=True,
                       capture_output=True, timeout=120)
        grey = cv2.imread(str(picture), cv2.IMREAD_GRAYSCALE)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)


def _bgr(cielab: list[int]) -> tuple[int, int, int]:
    """DICOM's CIELab (PS3.3 C.10.7.1.1: L 0..65535 for 0..100, a and b offset by 32768,
    0..65535 for -128..127) to 8-bit BGR."""
    lab = np.array([[[cielab[0] * 100 / 65535, cielab[1] * 255 / 65535 - 128,
                      cielab[2] * 255 / 65535 - 128]]], np.float32)
    bgr = np.clip(cv2.cvtColor(lab, cv2.COLOR_Lab2BGR)[0, 0] * 255, 0, 255)
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def draw(gsps: pydicom.Dataset, picture: np.ndarray, width: int) -> np.ndarray:
    """The layers' graphics and text over ``picture``, scaled to ``width`` columns."""
    scale = width / picture.shape[1]
    out = cv2.resize(picture, (width, round(picture.shape[0] * scale)),
                     interpolation=cv2.INTER_AREA)
    colours = {layer.GraphicLayer: _bgr(list(layer.GraphicLayerRecommendedDisplayCIELabValue))
               for layer in gsps.GraphicLayerSequence}
    thickness = max(1, round(width / 450))
    for annotation in gsps.GraphicAnnotationSequence:
        colour = colours[annotation.GraphicLayer]
        for item in annotation.get("GraphicObjectSequence", []):
            xy = np.asarray(item.GraphicData, np.float64).reshape(-1, 2) * scale
            if item.GraphicType == "POLYLINE":
                cv2.polylines(out, [np.rint(xy).astype(np.int32).reshape(-1, 1, 2)],
                              False, colour, thickness, cv2.LINE_AA)
            elif item.GraphicType == "POINT":
                cv2.circle(out, tuple(int(v) for v in np.rint(xy[0])), 2 * thickness,
                           colour, -1, cv2.LINE_AA)
        for text in annotation.get("TextObjectSequence", []):
            x0, y0 = (float(v) for v in text.BoundingBoxTopLeftHandCorner)
            _, y1 = (float(v) for v in text.BoundingBoxBottomRightHandCorner)
            height = (y1 - y0) * out.shape[0]
            font = height / 40
            origin = (round(x0 * out.shape[1]), round(y1 * out.shape[0] - height * 0.2))
            cv2.putText(out, text.UnformattedTextValue, origin, cv2.FONT_HERSHEY_SIMPLEX,
                        font, (0, 0, 0), thickness + 2, cv2.LINE_AA)
            cv2.putText(out, text.UnformattedTextValue, origin, cv2.FONT_HERSHEY_SIMPLEX,
                        font, colour, thickness, cv2.LINE_AA)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="RG1_UNCR.dcm",
                        help="a DICOM file, or the name of one in pydicom-data")
    parser.add_argument("--query", default="methods=gradcam,fixations&classes=Nodule",
                        help="/explain's query (dicom=gsps is added)")
    parser.add_argument("--width", type=int, default=900)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gsps.png")
    args = parser.parse_args()
    source = _source(args.source)
    data = _presentation_state(source, args.query)
    gsps = pydicom.dcmread(io.BytesIO(data))
    picture = draw(gsps, _rendered(source, data), args.width)
    ok, png = cv2.imencode(".png", picture, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    args.out.write_bytes(png.tobytes())
    print(f"{args.out}: {picture.shape[1]}x{picture.shape[0]}, {len(png.tobytes())} bytes; "
          f"{len(gsps.GraphicLayerSequence)} layers")


if __name__ == "__main__":
    main()
