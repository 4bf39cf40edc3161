"""Decoded image -> network input, and map resizing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.imaging.base import DecodedImage
from service.imaging.preprocess import BT601_LUMA, ModelInput, from_tensor, to_model_input
from service.models.spec import InputSpec, Layout
from tests.imaging import reference_preprocess


def _image(pixels: np.ndarray) -> DecodedImage:
    return DecodedImage(pixels=pixels.astype(np.float32), format="png")


def _spec(height: int, width: int, channels: int = 1, layout: Layout = Layout.NCHW) -> InputSpec:
    return InputSpec(
        height=height,
        width=width,
        channels=channels,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        layout=layout,
    )


def test_shrinking_is_block_mean() -> None:
    pixels = np.arange(16, dtype=np.float32).reshape(4, 4) / 15
    result = to_model_input(_image(pixels), _spec(2, 2))
    expected = np.array([[2.5, 4.5], [10.5, 12.5]], dtype=np.float32) / 15
    np.testing.assert_allclose(result.image01[:, :, 0], expected, atol=1e-6)
    np.testing.assert_allclose(result.tensor[0, 0], expected, atol=1e-6)


def test_shrinking_non_square_is_block_mean() -> None:
    pixels = np.arange(24, dtype=np.float32).reshape(4, 6) / 23
    result = to_model_input(_image(pixels), _spec(2, 3))
    blocks = pixels.reshape(2, 2, 3, 2).mean(axis=(1, 3))
    assert result.image01.shape == (2, 3, 1)
    np.testing.assert_allclose(result.image01[:, :, 0], blocks, atol=1e-6)


def test_growing_is_bilinear() -> None:
    pixels = np.array([[0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    result = to_model_input(_image(pixels), _spec(4, 4))
    # Half-pixel centres: source x = (x' + 0.5) / 2 - 0.5, clamped at the borders.
    np.testing.assert_allclose(result.image01[:, :, 0], [[0, 0.25, 0.75, 1]] * 4, atol=1e-6)


def test_mixed_resize_is_bilinear_not_area() -> None:
    pixels = np.random.default_rng(3).random((8, 3)).astype(np.float32)
    result = to_model_input(_image(pixels), _spec(4, 6))
    linear = cv2.resize(pixels, (6, 4), interpolation=cv2.INTER_LINEAR)
    area = cv2.resize(pixels, (6, 4), interpolation=cv2.INTER_AREA)
    assert not np.allclose(linear, area)
    np.testing.assert_array_equal(result.image01[:, :, 0], linear)


def test_same_size_is_untouched() -> None:
    pixels = np.random.default_rng(4).random((3, 5)).astype(np.float32)
    result = to_model_input(_image(pixels), _spec(3, 5))
    np.testing.assert_array_equal(result.image01[:, :, 0], pixels)


def test_grey_replicated_and_normalised_per_channel() -> None:
    pixels = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    spec = InputSpec(2, 2, 3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    result = to_model_input(_image(pixels), spec)
    assert result.image01.shape == (2, 2, 3)
    for channel in range(3):
        np.testing.assert_array_equal(result.image01[:, :, channel], pixels)
        expected = (pixels - spec.mean[channel]) / spec.std[channel]
        np.testing.assert_allclose(result.tensor[0, channel], expected, atol=1e-6)
    np.testing.assert_allclose(result.tensor[0, :, 0, 1], [0.0, 0.4, 0.4], atol=1e-6)


def test_layouts_hold_the_same_values() -> None:
    pixels = np.random.default_rng(5).random((3, 4, 3)).astype(np.float32)
    spec_nchw = InputSpec(3, 4, 3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    spec_nhwc = InputSpec(3, 4, 3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), layout=Layout.NHWC)
    nchw = to_model_input(_image(pixels), spec_nchw).tensor
    nhwc = to_model_input(_image(pixels), spec_nhwc).tensor
    assert nchw.shape == (1, 3, 3, 4) and nhwc.shape == (1, 3, 4, 3)
    assert nchw.dtype == nhwc.dtype == np.float32
    np.testing.assert_array_equal(nchw, nhwc.transpose(0, 3, 1, 2))
    expected = (pixels[2, 1] - (0.1, 0.2, 0.3)) / (0.5, 0.6, 0.7)
    np.testing.assert_allclose(nhwc[0, 2, 1], expected, atol=1e-6)


def test_rgb_to_one_channel_is_bt601_luminance() -> None:
    pixels = np.zeros((1, 4, 3), dtype=np.float32)
    pixels[0, 0] = (1, 0, 0)
    pixels[0, 1] = (0, 1, 0)
    pixels[0, 2] = (0, 0, 1)
    pixels[0, 3] = (0.5, 0.5, 0.5)
    result = to_model_input(_image(pixels), _spec(1, 4, channels=1))
    np.testing.assert_allclose(result.image01[0, :, 0], [*BT601_LUMA, 0.5], atol=1e-6)
    assert BT601_LUMA == (0.299, 0.587, 0.114)


def test_rgb_stays_rgb_for_three_channels() -> None:
    pixels = np.random.default_rng(6).random((2, 2, 3)).astype(np.float32)
    result = to_model_input(_image(pixels), _spec(2, 2, channels=3, layout=Layout.NHWC))
    np.testing.assert_array_equal(result.image01, pixels)
    assert isinstance(result, ModelInput)


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(2, 2, 2, mean=(0, 0), std=(1, 1)),
        InputSpec(2, 2, 3, mean=(0,), std=(1,)),
    ],
)
def test_bad_specs_are_rejected(spec: InputSpec) -> None:
    with pytest.raises(ValueError):
        to_model_input(_image(np.zeros((2, 2))), spec)


# ---- Against the previous implementation (tests/imaging/reference_preprocess.py) -----

_SHAPES = [
    ((1955, 1841), (256, 256)),  # a real CR's size: no integer ratio, two one-axis passes
    ((1760, 1760), (224, 224)),
    ((2048, 2048), (256, 256)),  # integer ratios: cv2's own fast path
    ((2048, 1841), (256, 256)),  # one integer ratio
    ((97, 61), (32, 20)),
    ((64, 64), (256, 256)),  # growing
    ((300, 100), (256, 256)),  # mixed
    ((256, 256), (256, 256)),
]


@pytest.mark.parametrize(("size", "target"), _SHAPES)
@pytest.mark.parametrize("colour", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("layout", [Layout.NCHW, Layout.NHWC])
def test_equals_the_previous_implementation(
    size: tuple[int, int], target: tuple[int, int], colour: bool, channels: int, layout: Layout
) -> None:
    rng = np.random.default_rng([*size, *target, colour])
    pixels = rng.random((*size, 3) if colour else size).astype(np.float32)
    spec = InputSpec(*target, channels, mean=tuple(rng.random(channels)),
                     std=tuple(0.1 + rng.random(channels)), layout=layout)
    new = to_model_input(_image(pixels), spec)
    old = reference_preprocess.to_model_input(_image(pixels), spec)
    for got, expected in ((new.image01, old.image01), (new.tensor, old.tensor)):
        assert got.shape == expected.shape and got.dtype == expected.dtype == np.float32
        assert got.flags.c_contiguous
        # Measured bit-identical for every case here; the contract is 1e-6.
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", list(Layout), ids=str)
def test_a_client_tensor_is_taken_as_it_is(layout: Layout) -> None:
    """from_tensor: the tensor unchanged, its 0..1 image recovered by undoing mean/std."""
    rng = np.random.default_rng(5)
    pixels = rng.random((24, 40, 3), dtype=np.float32)
    spec = InputSpec(24, 40, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), layout)
    built = to_model_input(DecodedImage(pixels=pixels, format="png"), spec)
    taken = from_tensor(built.tensor.copy(), spec)
    np.testing.assert_array_equal(taken.tensor, built.tensor)
    np.testing.assert_allclose(taken.image01, built.image01, rtol=0, atol=1e-6)
    wrong = built.tensor[:, :, :, :2] if layout is Layout.NCHW else built.tensor[:, :, :2]
    with pytest.raises(ValueError, match=r"shape \[1, .*\] is not the network input's"):
        from_tensor(wrong, spec)
