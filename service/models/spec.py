"""The parts of model.toml that describe how an image becomes a network input."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Layout(StrEnum):
    NCHW = "NCHW"
    NHWC = "NHWC"


@dataclass(frozen=True)
class InputSpec:
    """How to feed the network: size, channels, normalisation, layout.

    ``mean`` and ``std`` are on the 0..1 scale, one value per network channel.
    """

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: Layout = Layout.NCHW
