"""The most one answer may hold (``MEDEXPLAIN_MAX_ANSWER_BYTES``).

Outputs encode maps and captures one at a time, and each tells :func:`spend` what it
encoded; past the limit the request gets 422 ``answer_too_large`` instead of an answer the
service would have to hold whole. Measured on a 27-megapixel DICOM (4800 x 5600, 54 MB)
before the limit: its eight captures as multipart/related came to 746 MB (1.97 GB peak
RSS), its eight maps as npy at size=original to 1.15 GB of JSON (3.9 GB peak RSS), from
one request. With the limit, what a request holds is about the limit plus one map or
capture being encoded.

What an encoder holds that is not the answer (a segmentation's masks, a byte per pixel and
map where the answer has a bit) counts too, for as long as it is held (:func:`held`).

The limit is the route's, for the whole request (every instance of a KServe request
together); :meth:`AnswerLimit.applied` carries it through the render in a context
variable, so every encoder meets it without each being handed it. Outside one (the
command line writing files, tools), nothing is limited.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from service.errors import AnswerTooLarge

__all__ = ["AnswerLimit", "held", "spend"]


class AnswerLimit:
    """The bytes one request's answer may hold, and what its encoders have spent so far."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.spent = 0

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Count what the encoders called inside the block spend against this limit."""
        token = _CURRENT.set(self)
        try:
            yield
        finally:
            _CURRENT.reset(token)


_CURRENT: ContextVar[AnswerLimit | None] = ContextVar("answer_limit", default=None)


def spend(nbytes: int) -> None:
    """Count ``nbytes`` more of the answer being written.

    Raises:
        AnswerTooLarge: the answer now holds more than its limit.
    """
    limit = _CURRENT.get()
    if limit is None:
        return
    limit.spent += nbytes
    if limit.spent > limit.max_bytes:
        raise AnswerTooLarge(
            f"the answer would hold more than {limit.max_bytes} bytes "
            "(MEDEXPLAIN_MAX_ANSWER_BYTES): ask for fewer methods or classes, size=model or "
            "heatmap=png, and for DICOM one capture (application/dicom) or a compressed "
            "transfer-syntax")


@contextlib.contextmanager
def held(nbytes: int) -> Iterator[None]:
    """Count ``nbytes`` that an encoder holds while it writes, not in the answer (a
    segmentation's masks, a byte per pixel and map where the answer has a bit), for as
    long as the block runs: what the request holds stays within its limit.

    Raises:
        AnswerTooLarge: with them, the request would hold more than its limit.
    """
    limit = _CURRENT.get()
    if limit is None:
        yield
        return
    try:
        spend(nbytes)  # counts them, then raises when past the limit
        yield
    finally:
        limit.spent -= nbytes
