"""Content negotiation for /explain: JSON, one DICOM object, or multipart/related DICOM.

The Accept header picks the packaging only. Which DICOM object is chosen by the ``dicom``
parameter: a Secondary Capture and a Structured Report are both ``application/dicom``
(there is no registered media type per SOP class).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from starlette.requests import Request

from service.outputs.base import DICOM, Packaging

# The only transfer syntax DICOM answers are written in.
_EXPLICIT_VR_LITTLE_ENDIAN: Final[str] = "1.2.840.10008.1.2.1"


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


def _specificity(media: _MediaRange, offer: Packaging) -> int | None:
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
    if offer is Packaging.JSON:
        return 2
    if offer is Packaging.MULTIPART and media.params.get("type", DICOM) != DICOM:
        return None
    if media.params.get("transfer-syntax", "*") not in ("*", _EXPLICIT_VR_LITTLE_ENDIAN):
        return None
    return 2 + len(media.params)


def negotiate(accept: str | None) -> list[Packaging]:
    """The packagings the Accept header allows, best first.

    Each offer gets the quality of its most specific matching range; higher quality comes
    first, ties in the server's order (JSON first). No or an empty Accept header is JSON.
    Empty when the header allows none.

    Args:
        accept: the request's Accept header(s), comma-joined; None when absent.
    """
    if accept is None or not accept.strip():
        return [Packaging.JSON]
    ranges = _media_ranges(accept)
    ranked: list[tuple[float, int, Packaging]] = []
    for order, offer in enumerate(Packaging):
        matches = [(spec, r.q) for r in ranges
                   if (spec := _specificity(r, offer)) is not None]
        if matches and (q := max(matches)[1]) > 0:
            ranked.append((-q, order, offer))
    return [offer for _, _, offer in sorted(ranked)]


def accept_header(request: Request) -> str | None:
    values = request.headers.getlist("accept")
    return ", ".join(values) if values else None
