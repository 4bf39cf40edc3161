"""Content negotiation for /explain: JSON, one DICOM object, or multipart/related DICOM.

The Accept header picks the packaging, and for DICOM the transfer syntax (its
``transfer-syntax`` parameter: service.outputs.transfer_syntax). Which DICOM object is
chosen by the ``dicom`` parameter: a Secondary Capture and a Structured Report are both
``application/dicom`` (there is no registered media type per SOP class).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from starlette.requests import Request

from service.outputs.base import DICOM, Packaging
from service.outputs.transfer_syntax import DEFAULT, TRANSFER_SYNTAXES, TransferSyntax


class Offer(NamedTuple):
    """One answer the service can give: a packaging and, for DICOM, a transfer syntax."""

    packaging: Packaging
    transfer_syntax: TransferSyntax = DEFAULT


# Every offer in the server's order: JSON, then each packaging of DICOM in each syntax.
OFFERS: tuple[Offer, ...] = (Offer(Packaging.JSON), *(
    Offer(p, t) for p in (Packaging.DICOM, Packaging.MULTIPART)
    for t in TRANSFER_SYNTAXES.values()))


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


def _specificity(media: _MediaRange, offer: Offer) -> int | None:
    """How closely a media range matches an offer (higher is closer); None: no match.

    A range without a transfer-syntax parameter (``*/*`` and ``application/*`` included)
    asks for the default syntax, as DICOMweb has it; ``transfer-syntax=*`` takes any.
    """
    packaging, syntax = offer
    kind, _, subtype = packaging.value.split(";")[0].partition("/")
    if media.type == "*" and media.subtype == "*":
        specificity = 0
    elif media.type != kind:
        return None
    elif media.subtype == "*":
        specificity = 1
    elif media.subtype != subtype:
        return None
    elif packaging is Packaging.JSON:
        return 2
    elif packaging is Packaging.MULTIPART and media.params.get("type", DICOM) != DICOM:
        return None
    else:
        specificity = 2 + len(media.params)
    asked = media.params.get("transfer-syntax")
    if packaging is not Packaging.JSON and asked != "*" and (asked or DEFAULT.uid) != syntax.uid:
        return None
    return specificity


def negotiate(accept: str | None) -> list[Offer]:
    """The answers the Accept header allows, best first.

    Each offer gets the quality of its most specific matching range; higher quality comes
    first, ties in the server's order (JSON first, the default transfer syntax before the
    others). No or an empty Accept header is JSON. Empty when the header allows none.

    Args:
        accept: the request's Accept header(s), comma-joined; None when absent.
    """
    if accept is None or not accept.strip():
        return [Offer(Packaging.JSON)]
    ranges = _media_ranges(accept)
    ranked: list[tuple[float, int, Offer]] = []
    for order, offer in enumerate(OFFERS):
        matches = [(spec, r.q) for r in ranges
                   if (spec := _specificity(r, offer)) is not None]
        if matches and (q := max(matches)[1]) > 0:
            ranked.append((-q, order, offer))
    return [offer for _, _, offer in sorted(ranked)]


def accept_header(request: Request) -> str | None:
    values = request.headers.getlist("accept")
    return ", ".join(values) if values else None
