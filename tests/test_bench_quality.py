"""The explanation-quality metrics of tools/bench.py quality, on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from tools import quality


def _square(size: int, x0: int, y0: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y0 + side, x0:x0 + side] = True
    return mask


def test_energy_fraction() -> None:
    mask = _square(16, 4, 4, 4)
    assert quality.energy_fraction(mask.astype(np.float32), mask) == 1.0
    assert quality.energy_fraction(np.ones((16, 16)), mask) == pytest.approx(16 / 256)
    signed = np.where(mask, -3.0, 0.0)
    signed[0, 0] = 1.0
    assert quality.energy_fraction(signed, mask) == pytest.approx(48 / 49)  # |map| counts
    assert quality.energy_fraction(np.zeros((16, 16)), mask) == 0.0


def test_pointing_hit_tolerance_is_a_disc() -> None:
    mask = np.zeros((32, 32), dtype=bool)
    mask[10, 20] = True
    peak = np.zeros((32, 32))
    peak[10, 16] = 1.0
    assert quality.pointing_hit(peak, mask, 4)
    assert not quality.pointing_hit(peak, mask, 3)
    diagonal = np.zeros((32, 32))
    diagonal[14, 16] = -1.0  # |map| counts; 4·√2 ≈ 5.7 px away, outside cv2's radius-4 disc
    assert not quality.pointing_hit(diagonal, mask, 4)
    assert quality.pointing_hit(diagonal, mask, 6)


def test_boxes() -> None:
    assert quality.mask_box(_square(16, 3, 5, 4)) == (3, 5, 7, 9)
    assert quality.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert quality.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert quality.box_iou((0, 0, 4, 4), (4, 4, 8, 8)) == 0.0


def test_removal_order_breaks_ties_at_random() -> None:
    values = np.zeros((8, 8))
    values[5, 6] = 2.0
    values[1, 1] = -1.0
    first = [quality.removal_order(values, np.random.default_rng(s))[:3] for s in range(4)]
    assert all(f[0] == 5 * 8 + 6 and f[1] == 9 for f in first)
    assert len({int(f[2]) for f in first}) > 1  # the zero plateau has no fixed order


def test_deletion_and_insertion_on_a_toy_model() -> None:
    """Toy model: the probability is the share of the bright square still present."""
    mask = _square(16, 4, 4, 4)
    image = mask.astype(np.float32)
    baseline = np.zeros_like(image)

    def predict(batch: np.ndarray) -> np.ndarray:
        return batch[:, mask].mean(axis=1, keepdims=True)

    rng = np.random.default_rng(0)
    # 16 steps of 16 pixels: the mask's 16 pixels go in the first step.
    deletion, insertion = quality.deletion_insertion(image, baseline, image, predict, 16, rng)
    assert deletion[0] == pytest.approx(0.5 / 16)
    assert insertion[0] == pytest.approx(1 - 0.5 / 16)
    random_del, random_ins = zip(*(quality.deletion_insertion(
        image, baseline, rng.random(image.shape), predict, 16, rng) for _ in range(20)))
    assert deletion[0] < 0.1
    assert 0.4 < float(np.mean(random_del)) < 0.6
    assert insertion[0] > 0.9
    assert 0.4 < float(np.mean(random_ins)) < 0.6


def test_auc_of_straight_lines() -> None:
    assert float(quality.auc(np.linspace(1, 0, 51))) == pytest.approx(0.5)
    np.testing.assert_allclose(quality.auc(np.ones((11, 3))), [1, 1, 1])
