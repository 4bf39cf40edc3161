"""Rendering: map math, 8-bit maps, overlays and encoders against independent references."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest

from service.imaging.base import DecodedImage
from service.methods.maps import normalise, resize, smooth
from service.methods.regions import regions
from service.outputs import render
from tests.outputs import reference


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


def test_to_uint8_normalises_on_the_map_grid_and_upsamples_once() -> None:
    rng = np.random.default_rng(0)
    cam = rng.random((16, 16)).astype(np.float32) * 7
    got = render.to_uint8(normalise(cam), 1955, 1841)
    assert got.dtype == np.uint8 and got.shape == (1955, 1841)
    np.testing.assert_allclose(got, reference.strength(cam, 1955, 1841), atol=1)
    # On its own grid it is exactly round(255 · |map| / max).
    np.testing.assert_array_equal(render.to_uint8(normalise(cam), 16, 16),
                                  np.round(cam / cam.max() * 255))


def test_encoders_round_trip() -> None:
    levels = np.array([[0, 64], [191, 255]], np.uint8)
    png = cv2.imdecode(np.frombuffer(render.png(levels), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(png, levels)
    values = np.array([[0.0, -1.5], [3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(np.load(io.BytesIO(render.npy(values))), values)
    picture = np.full((32, 32, 3), 120, np.uint8)
    jpeg = cv2.imdecode(np.frombuffer(render.jpeg(picture), np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(jpeg.astype(int) - 120).max() <= 2


def test_overlay_matches_the_reference_blend() -> None:
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 256, (40, 30)).astype(np.uint8)
    levels[:5] = 0
    grey01 = rng.random((40, 30)).astype(np.float32)
    grey = render.grey_uint8(grey01, 40, 30)
    np.testing.assert_array_equal(grey, np.round(grey01 * 255))
    rgb = render.overlay(levels, grey, rgb=True)
    np.testing.assert_array_equal(rgb, reference.overlay(levels, grey01))
    # Where the map is zero the overlay is the grey image itself.
    np.testing.assert_array_equal(rgb[:5], np.repeat(grey[:5, :, None], 3, axis=2))
    np.testing.assert_array_equal(render.overlay(levels, grey), rgb[:, :, ::-1])
    with pytest.raises(ValueError, match="grids differ"):
        render.overlay(levels, grey[:20])


def test_canvas_overlay_of_a_gradient_map_shows_local_magnitude() -> None:
    speckle = np.zeros((64, 64), np.float32)
    speckle[30:34:2, 30:34:2] = [[1.0, -1.0], [-1.0, 1.0]]  # sparse, signed, like a gradient
    image01 = np.full((64, 64, 3), 0.5, np.float32)
    image = DecodedImage(pixels=np.full((128, 96), 0.5, np.float32), format="png")
    canvas = render.Canvas(image, image01)
    sigma = render.display_sigma(speckle.shape, gradient=True)
    assert sigma == pytest.approx(0.01 * np.hypot(64, 64))
    for h, w, grey01 in ((64, 64, image01[..., 0]), (128, 96, image.pixels)):
        got = canvas.overlay(speckle, True, h, w, rgb=True)
        levels = reference.strength(speckle, h, w, sigma)
        assert np.abs(got.astype(int) - reference.overlay(levels, grey01)).max() <= 1
    raw = canvas.overlay(speckle, False, 64, 64, rgb=True)
    smoothed = canvas.overlay(speckle, True, 64, 64, rgb=True)
    # The smoothed overlay colours a neighbourhood, the raw one only the four pixels.
    grey = np.all(raw == 128, axis=2).sum(), np.all(smoothed == 128, axis=2).sum()
    assert grey[0] == 64 * 64 - 4 and grey[1] < grey[0] - 30


def test_smooth_is_a_gaussian() -> None:
    impulse = np.zeros((21, 21), np.float32)
    impulse[10, 10] = 1
    blurred = smooth(impulse, 2.0)
    x = np.arange(-10, 11)
    g = np.exp(-x**2 / 8)
    np.testing.assert_allclose(blurred, np.outer(g, g) / g.sum() ** 2, atol=1e-4)


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


def _outside(cells: np.ndarray) -> np.ndarray:
    """The cells outside ``cells`` reachable from the border through other cells outside
    (4-connected): what is neither a region nor one of its holes."""
    height, width = cells.shape
    free = np.pad((cells == 0).astype(np.uint8), 1, constant_values=1)
    mask = np.zeros((height + 4, width + 4), np.uint8)
    cv2.floodFill(free, mask, (0, 0), 2, flags=4)
    return free[1:-1, 1:-1] == 2


def test_region_outlines_give_back_their_cells() -> None:
    rng = np.random.default_rng(7)
    grid = cv2.GaussianBlur(rng.random((40, 50)).astype(np.float32), (0, 0), 2.0)
    grid[5:15, 5:15] = 1.0
    grid[8:12, 8:12] = 0.0  # a hole
    grid[30, 3] = 1.0  # one cell
    grid = (grid - grid.min()) / (grid.max() - grid.min())
    scale = (3.0, 2.0)
    found = regions(grid, 0.6, *scale)
    assert len(found) >= 3
    taken = np.zeros(grid.shape, bool)
    for region in found:
        assert region.outline is not None and region.outline.shape[1] == 2
        # Cell centres: back on the grid, whole numbers.
        cells_xy = region.outline / np.array(scale) - 0.5
        np.testing.assert_allclose(cells_xy, np.round(cells_xy), atol=1e-9)
        cells_xy = np.round(cells_xy).astype(np.int32)
        x, y = cells_xy[0]
        assert grid[y, x] > 0.6
        # The region: the 8-connected cells above the cut that hold its first vertex.
        above = (grid > 0.6).astype(np.uint8)
        flood = np.zeros((grid.shape[0] + 2, grid.shape[1] + 2), np.uint8)
        cv2.floodFill(above.copy(), flood, (int(x), int(y)), 2, flags=8 | (1 << 8))
        cells = flood[1:-1, 1:-1].astype(bool)
        assert not (cells & taken).any()
        taken |= cells
        filled = np.zeros(grid.shape, np.uint8)
        cv2.fillPoly(filled, [cells_xy.reshape(-1, 1, 2)], 1)
        np.testing.assert_array_equal(filled.astype(bool), cells | (~cells & ~_outside(cells)))
        # The box holds the outline, within a cell of each edge.
        x0, y0, x1, y1 = region.box
        assert x0 <= region.outline[:, 0].min() <= x0 + scale[0]
        assert x1 - scale[0] <= region.outline[:, 0].max() <= x1
        assert y0 <= region.outline[:, 1].min() <= y0 + scale[1]
        assert y1 - scale[1] <= region.outline[:, 1].max() <= y1
    (one,) = [r for r in found if r.box == (9, 60, 12, 62)]
    np.testing.assert_array_equal(one.outline, [[10.5, 61.0]])  # the cell's centre alone
    holed = next(r for r in found if r.box[0] <= 15 <= r.box[2] and r.box[1] <= 10 <= r.box[3])
    assert holed.outline is not None


def test_boxes_end_at_the_image_edge() -> None:
    # 224 cells of 29 / 224 pixels end at 29.000000000000004: the box ended at 30, a pixel
    # outside the image (and a presentation state's polyline out of it).
    grid = np.zeros((224, 224), np.float32)
    grid[-3:, -3:] = 1.0
    grid[:2, :2] = 1.0
    for width in range(1, 600):
        found = regions(grid, 0.5, width / 224, width / 224)
        assert max(r.box[2] for r in found) == width, width
        assert min(r.box[0] for r in found) == 0
    (whole,) = regions(np.ones((7, 224), np.float32), 0.5, 58 / 224, 3.0)
    assert whole.box == (0, 0, 58, 21)


def test_diagonal_pixels_join_one_region() -> None:
    (region,) = regions(np.eye(4, dtype=np.float32), 0.5, 1, 1)
    assert region.box == (0, 0, 4, 4)
