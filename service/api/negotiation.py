"""Content negotiation for /explain: JSON, one DICOM, or multipart/related DICOM.

Which DICOM object is chosen by the ``dicom`` parameter, not by the Accept header: both a
Secondary Capture and a Structured Report are ``application/dicom`` (there is no registered
media type per SOP class), so the Accept header picks the packaging and ``dicom=sc|sr``
the object.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Final

from starlette.requests import Request

DICOM: Final[str] = "application/dicom"
MULTIPART_DICOM: Final[str] = 'multipart/related; type="application/dicom"'
# The only transfer syntax the captures are written in.
_EXPLICIT_VR_LITTLE_ENDIAN: Final[str] = "1.2.840.10008.1.2.1"


class Representation(Enum):
    """What /explain can answer with, in the server's order of preference."""

    JSON = "application/json"
    DICOM = DICOM
    MULTIPART = MULTIPART_DICOM


class DicomObject(StrEnum):
    """The ``dicom`` parameter: what a DICOM answer holds (default: Secondary Captures)."""

    SC = "sc"  # Secondary Capture(s): the maps over the image
    SR = "sr"  # one Comprehensive 3D SR (TID 1500): scores and regions of every explanation


def dicom_object(value: str | None) -> DicomObject | None:
    """The parsed ``dicom`` parameter (empty or absent: SC); None for an unknown value."""
    if value is None or not value.strip():
        return DicomObject.SC
    try:
        return DicomObject(value.strip().lower())
    except ValueError:
        return None


@dataclass(frozen=True)
class _MediaRange:
    type: str
    subtype: str
    params: dict[str, str]
    q: float


# Comma- and semicolon-separated lists whose items may hold quoted strings.
_LIST_ITEM = re.compile(r'(?:[^,"]|"[^"]*")+')
_PARAM_ITEM = re.compile(r'(?:[^;"]|"[^"]*")+')


def _media_ranges(accept: str) -> list[_MediaRange]:
    """Parse an Accept header (RFC 9110 12.5.1); malformed ranges are skipped."""
    ranges = []
    for item in _LIST_ITEM.findall(accept):
        pieces = [p.strip() for p in _PARAM_ITEM.findall(item)]
        if not pieces or pieces[0].count("/") != 1:
            continue
        kind, subtype = (x.strip().lower() for x in pieces[0].split("/"))
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"').lower()
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            continue
        if kind and subtype and 0 <= q <= 1:
            ranges.append(_MediaRange(kind, subtype, params, q))
    return ranges


def _specificity(media: _MediaRange, offer: Representation) -> int | None:
    """How closely a media range matches an offer (higher is closer); None: no match."""
    kind, _, subtype = offer.value.split(";")[0].partition("/")
    if media.type == "*" and media.subtype == "*":
        return 0
    if media.type != kind:
        return None
    if media.subtype == "*":
        return 1
    if media.subtype != subtype:
        return None
    if offer is Representation.JSON:
        return 2
    if offer is Representation.MULTIPART and media.params.get("type", DICOM) != DICOM:
        return None
    if media.params.get("transfer-syntax", "*") not in ("*", _EXPLICIT_VR_LITTLE_ENDIAN):
        return None
    return 2 + len(media.params)


def negotiate(accept: str | None, *, dicom: bool) -> Representation | None:
    """The representation to answer with, or None when the Accept header allows none.

    Each offer gets the quality of its most specific matching range; the highest quality
    wins, ties go to the server's order (JSON first). No or an empty Accept header is JSON.

    Args:
        accept: the request's Accept header(s), comma-joined; None when absent.
        dicom: whether DICOM output is possible (a DICOM upload with a study to join).
    """
    if accept is None or not accept.strip():
        return Representation.JSON
    ranges = _media_ranges(accept)
    offers = [o for o in Representation if dicom or o is Representation.JSON]
    best, best_q = None, 0.0
    for offer in offers:
        matches = [(spec, r.q) for r in ranges
                   if (spec := _specificity(r, offer)) is not None]
        if not matches:
            continue
        q = max(matches)[1]
        if q > best_q:
            best, best_q = offer, q
    return best


def accept_header(request: Request) -> str | None:
    values = request.headers.getlist("accept")
    return ", ".join(values) if values else None


def multipart_related(parts: list[bytes]) -> tuple[bytes, str]:
    """A multipart/related body (RFC 2387) of DICOM parts, and its boundary."""
    boundary = secrets.token_hex(16)
    while any(boundary.encode() in part for part in parts):
        boundary = secrets.token_hex(16)
    chunks = []
    for part in parts:
        chunks += [b"--", boundary.encode(), b"\r\nContent-Type: ", DICOM.encode(),
                   b"\r\n\r\n", part, b"\r\n"]
    chunks += [b"--", boundary.encode(), b"--\r\n"]
    return b"".join(chunks), boundary
