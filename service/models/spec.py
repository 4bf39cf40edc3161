"""The parts of model.toml that describe how an image becomes a network input, which
images a model is meant for, and what its labels mean in a coding scheme."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from pydicom.tag import Tag

from service.errors import DicomNotAccepted

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


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


@dataclass(frozen=True)
class LabelCode:
    """What a label means in a coding scheme (model.toml ``[codes]``), for the Structured
    Report's finding type: e.g. SCT 287272002 "Cardiomegaly". Without one, a label is coded
    in the service's local scheme."""

    scheme: str  # Coding Scheme Designator (SH): "SCT", "RADLEX", ...
    value: str  # Code Value (SH, at most 16 characters)
    meaning: str  # Code Meaning (LO, at most 64 characters)


class Attribute(StrEnum):
    """The DICOM attributes a model may restrict, by the model.toml key that lists them."""

    modalities = "Modality"
    body_parts = "BodyPartExamined"
    view_positions = "ViewPosition"
    presentation_intents = "PresentationIntentType"


@dataclass(frozen=True)
class Accepts:
    """Which DICOM images a model is meant for (model.toml ``[accepts]``).

    Each key lists the accepted values of one attribute (upper case Defined Terms, e.g.
    ``modalities = ["CR", "DX"]``); an empty list accepts any value. Modality is Type 1, so
    a listed modality must be present. Body Part Examined (Type 3) and View Position
    (Type 2) are often left empty by modalities: an absent or empty value is accepted, a
    present one must be listed. So is Presentation Intent Type, which DX, mammography and
    intra-oral images carry (Type 1) and CR does not: "FOR PROCESSING" marks the detector's
    raw values, meant for image processing and not for display (PS3.3 C.8.11.1.1.1), which a
    network trained on displayed radiographs has never seen. PNG and JPEG carry no such
    header and are not checked.
    """

    modalities: frozenset[str] = frozenset()
    body_parts: frozenset[str] = frozenset()
    view_positions: frozenset[str] = frozenset()
    presentation_intents: frozenset[str] = frozenset()

    def refusal(self, source: Dataset) -> str | None:
        """Why the header's image is not for this model; None when it is."""
        for attribute in Attribute:
            allowed: frozenset[str] = getattr(self, attribute.name)
            if not allowed:
                continue
            value = _code_string(source, attribute.value)
            if value is None and attribute is not Attribute.modalities:
                continue
            if value not in allowed:
                # Code strings are Defined Terms, not patient data; an odd value is not
                # quoted all the same (it could be anything a sender put there).
                shown = value if value is not None and _CODE.fullmatch(value) else (
                    "absent" if value is None else "not a code string")
                return (f"{attribute.value} is {shown}; the model accepts "
                        f"{', '.join(sorted(allowed))}")
        return None


class Guarded(Protocol):
    """A served model as the guard sees it: its networks, each with its model.toml."""

    @property
    def name(self) -> str: ...

    @property
    def members(self) -> Sequence[_Configured]: ...


class _Configured(Protocol):
    @property
    def config(self) -> _WithAccepts: ...


class _WithAccepts(Protocol):
    @property
    def accepts(self) -> Accepts: ...


def check_accepted(model: Guarded, source: Dataset) -> None:
    """Refuse a DICOM object that any of the model's networks is not meant for.

    Called by the decoder with the object's attributes, before any size check or pixel
    decode: an image the model is not for is told so, whatever its size or encoding.

    Raises:
        DicomNotAccepted: naming the attribute and the accepted values.
    """
    for member in model.members:
        reason = member.config.accepts.refusal(source)
        if reason is not None:
            raise DicomNotAccepted(f"model {model.name} is not for this image: {reason}")


# CS: upper case letters, digits, space and underscore, at most 16 characters.
_CODE = re.compile(r"[A-Z0-9 _]{1,16}")


def _code_string(source: Dataset, keyword: str) -> str | None:
    """A code string element's value, read from its raw bytes (pydicom's validation of a
    value would warn, quoting it); None when absent or empty."""
    element = source.get_item(Tag(keyword))
    if element is None or element.value is None:
        return None
    value = element.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value).strip(" \x00").upper()
    return text or None
