"""The demo model's maps land on the planted findings of the shipped phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.imaging import decode
from service.imaging.preprocess import to_model_input
from service.methods import METHODS, rows
from service.methods.maps import resize
from service.models.repository import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[2]
PHANTOMS = ROOT / "tests" / "data" / "phantoms"
LABELS = ("Cardiomegaly", "Nodule", "Pleural Effusion", "Pneumothorax")
# The pointing game's usual tolerance (Zhang et al. 2016: 15 px at 224²), scaled to 256².
TOLERANCE_PX = 17


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model(ROOT / "models" / "demo-cxr", providers=["CPUExecutionProvider"],
                      threads=1, head_batch=256)


def _cases() -> list[tuple[str, str, str]]:
    manifest = json.loads((PHANTOMS / "manifest.json").read_text())
    return [(item["file"], label, mask) for item in manifest
            for label, mask in item["findings"].items()]


def _hits(demo: LoadedModel, method: str) -> list[bool]:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                       (2 * TOLERANCE_PX + 1, 2 * TOLERANCE_PX + 1))
    hits = []
    for file, label, mask_file in _cases():
        image = decode((PHANTOMS / file).read_bytes(), "image/png")
        spec = demo.config.input
        captures = demo.engine.capture(to_model_input(image, spec).tensor,
                                       demo.config.activation, spec)
        (raw,) = METHODS[method].compute(captures, rows([LABELS.index(label)]))
        values = resize(raw.values, 256, 256)
        y, x = np.unravel_index(int(np.argmax(values)), values.shape)
        mask = cv2.imread(str(PHANTOMS / mask_file), cv2.IMREAD_GRAYSCALE) > 0
        hits.append(bool(cv2.dilate(mask.astype(np.uint8), kernel)[y, x]))
    return hits


@pytest.mark.parametrize("method", ["gradcam", "crm"])
def test_pointing_game_on_shipped_phantoms(demo: LoadedModel, method: str) -> None:
    hits = _hits(demo, method)
    assert len(hits) == 12
    # Measured: 11 of 12 for both (BENCHMARKS.md has the 300-phantom table).
    assert sum(hits) >= 10, f"{method}: {sum(hits)} of {len(hits)} findings hit"


def test_pointing_game_beats_chance(demo: LoadedModel) -> None:
    # A map that ignores the image (its peak at the centre) hits far less often.
    centre_hits = 0
    for _, _, mask_file in _cases():
        mask = cv2.imread(str(PHANTOMS / mask_file), cv2.IMREAD_GRAYSCALE) > 0
        centre_hits += bool(mask[128, 128])
    assert sum(_hits(demo, "gradcam")) > centre_hits + 4
