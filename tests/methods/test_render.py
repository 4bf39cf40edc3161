"""Post-processing: resizing, encodings, regions."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np

from service.methods.regions import regions
from service.methods.render import Encoding, encode, normalise, overlay, resize, smooth


def test_resize_non_square_orientation_and_values() -> None:
    ramp = np.tile(np.array([0.0, 1.0, 2.0], dtype=np.float32), (2, 1))  # 2 rows × 3 columns
    wide = resize(ramp, 4, 6)
    assert wide.dtype == np.float32
    np.testing.assert_allclose(wide, [[0, 0.25, 0.75, 1.25, 1.75, 2]] * 4, atol=1e-6)
    np.testing.assert_allclose(resize(ramp, 5, 2), [[0.25, 1.75]] * 5, atol=1e-6)
    rgb = np.stack([ramp, ramp * 2, ramp * 3], axis=2)
    np.testing.assert_allclose(resize(rgb, 4, 6)[..., 2], 3 * wide, atol=1e-6)


def test_normalise() -> None:
    np.testing.assert_array_equal(normalise(np.array([[0, 2], [4, 1]], np.float32)),
                                  [[0, 0.5], [1, 0.25]])
    np.testing.assert_array_equal(normalise(np.zeros((2, 2), np.float32)), np.zeros((2, 2)))


def _decode(data: str) -> bytes:
    return base64.b64decode(data)


def test_encodings() -> None:
    values = np.array([[0.0, 1.0], [3.0, 4.0]], np.float32)
    image = np.full((2, 2), 0.5, np.float32)
    npy = np.load(io.BytesIO(_decode(encode(values, Encoding.NPY, image))))
    np.testing.assert_array_equal(npy, values)
    png = cv2.imdecode(np.frombuffer(_decode(encode(values, Encoding.PNG, image)), np.uint8),
                       cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(png, [[0, 64], [191, 255]])
    rgb = overlay(normalise(values), image)
    # Where the map is zero the overlay is the grey image itself.
    np.testing.assert_array_equal(rgb[0, 0], [128, 128, 128])
    # At the peak: 55 % grey + 45 % of JET's top colour (dark red).
    jet = cv2.cvtColor(cv2.applyColorMap(np.array([[255]], np.uint8), cv2.COLORMAP_JET),
                       cv2.COLOR_BGR2RGB)[0, 0]
    np.testing.assert_array_equal(rgb[1, 1], np.round(128 * 0.55 + jet * 0.45))


def test_regions_boxes_in_original_pixels() -> None:
    grid = np.zeros((8, 10), np.float32)
    grid[1:3, 2:5] = 1.0  # peak 1.0
    grid[5:7, 7:9] = 0.7  # second blob
    grid[6, 0] = 0.4  # below the threshold
    found = regions(grid, 0.5, scale_x=2.0, scale_y=3.0)
    assert [r.box for r in found] == [(4, 3, 10, 9), (14, 15, 18, 21)]
    assert [r.score for r in found] == [1.0, 0.7]
    assert regions(grid, 0.99, 1, 1)[0].box == (2, 1, 5, 3)
    assert regions(np.zeros((4, 4), np.float32), 0.5, 1, 1) == []


def test_diagonal_pixels_join_one_region() -> None:
    (region,) = regions(np.eye(4, dtype=np.float32), 0.5, 1, 1)
    assert region.box == (0, 0, 4, 4)


def test_overlay_of_gradient_maps_shows_local_magnitude() -> None:
    speckle = np.zeros((64, 64), np.float32)
    speckle[30:34:2, 30:34:2] = [[1.0, -1.0], [-1.0, 1.0]]  # sparse, signed, like a gradient
    image = np.full((64, 64), 0.5, np.float32)

    def decoded(sigma: float) -> np.ndarray:
        data = base64.b64decode(encode(speckle, Encoding.OVERLAY, image, overlay_sigma=sigma))
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                            cv2.COLOR_BGR2RGB)

    raw, smoothed = decoded(0.0), decoded(3.0)
    np.testing.assert_array_equal(raw, overlay(normalise(speckle), image))
    expected = overlay(normalise(smooth(np.abs(speckle), 3.0)), image)
    np.testing.assert_array_equal(smoothed, expected)
    # The smoothed overlay colours a neighbourhood, the raw one only the four pixels.
    grey = np.all(raw == 128, axis=2).sum(), np.all(smoothed == 128, axis=2).sum()
    assert grey[0] == 64 * 64 - 4 and grey[1] < grey[0] - 50
