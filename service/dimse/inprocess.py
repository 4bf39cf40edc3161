"""The app's own ``POST /explain``, called in process from the SCP's threads.

The request is a plain ASGI call on the app's event loop, with the lifespan state in its
scope as a server would put it, so a received image meets the same route an HTTP client
does (API key, limits, guard, admission queue, metrics, outputs) and no code path of its
own. Nothing touches the network or the disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from service.config import Settings
from service.outputs.base import DICOM, MULTIPART_DICOM
from service.outputs.transfer_syntax import TRANSFER_SYNTAXES, media_type

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]

_BOUNDARY = re.compile(r';\s*boundary="?([^";]+)"?')
# How long a timed-out call waits for the app to abandon the request once hung up (it
# answers at once: the compute in a thread is not waited for), before cancelling it.
_HANG_UP_WAIT_S = 2.0


@dataclass(frozen=True)
class Answer:
    """What /explain answered: status, media type, body."""

    status: int
    media_type: str
    body: bytes

    def objects(self) -> list[bytes]:
        """The DICOM objects of a 200 answer: the body, or the parts of multipart/related."""
        if self.media_type.partition(";")[0].strip() == DICOM:
            return [self.body]
        match = _BOUNDARY.search(self.media_type)
        if not self.media_type.startswith("multipart/related") or match is None:
            raise ValueError("the answer holds no DICOM objects")
        delimiter = b"--" + match.group(1).encode()
        # The writer picks a boundary found in no part (outputs.base.multipart_related).
        body = self.body.split(delimiter + b"--", 1)[0]
        parts = []
        for chunk in body.split(delimiter)[1:]:
            _head, _, payload = chunk.partition(b"\r\n\r\n")
            parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
        return parts


class InProcess:
    """Calls the app's /explain on its event loop from any thread."""

    def __init__(self, app: object, state: object, loop: asyncio.AbstractEventLoop,
                 settings: Settings) -> None:
        self._app: ASGIApp = app  # type: ignore[assignment]
        self._state = state
        self._loop = loop
        self._query = parse_qsl(settings.dicom_query)
        self._accept = media_type(MULTIPART_DICOM,
                                  TRANSFER_SYNTAXES[settings.dicom_transfer_syntax]).encode()
        # When the service needs API keys, the SCP is a client like any other.
        self._headers = [(b"x-api-key", settings.api_keys[0].encode())] if settings.api_keys \
            else []

    def explain(self, dicom: bytes, outputs: str, timeout_s: float) -> Answer:
        """``POST /explain?<dicom_query>&dicom=<outputs>`` with the DICOM body, answered as
        multipart/related DICOM in ``dicom_transfer_syntax``; blocks the calling thread,
        never the loop.

        Raises:
            TimeoutError: no answer within ``timeout_s`` (the request is cancelled).
        """
        query = urlencode([*self._query, ("dicom", outputs)]).encode()
        gone = asyncio.Event()
        future = asyncio.run_coroutine_threadsafe(self._call(query, dicom, gone), self._loop)
        try:
            return future.result(timeout=timeout_s)
        except TimeoutError:
            # Hang up as an HTTP client does: the edge abandons the request (its queued
            # compute dropped) and the metrics count it as 499, not as a server error.
            self._loop.call_soon_threadsafe(gone.set)
            # Its own end (an answer, a cancellation, an error) has nobody to read it.
            done, _ = concurrent.futures.wait([future], timeout=_HANG_UP_WAIT_S)
            if not done:
                future.cancel()
            raise TimeoutError from None

    async def _call(self, query: bytes, body: bytes, gone: asyncio.Event) -> Answer:
        scope: Scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/explain", "raw_path": b"/explain",
            "root_path": "", "query_string": query, "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
            "headers": [(b"content-type", DICOM.encode()),
                        (b"accept", self._accept),
                        (b"content-length", str(len(body)).encode()), *self._headers],
            # A server hands each request a shallow copy of the lifespan state.
            "state": dict(self._state),  # type: ignore[call-overload]
        }
        sent = False
        status = 500
        media_type = ""
        chunks: list[bytes] = []

        async def receive() -> Message:
            nonlocal sent
            if sent:  # the body is whole: what is left to tell is the hang-up
                await gone.wait()
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            nonlocal status, media_type
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", []):
                    if name.lower() == b"content-type":
                        media_type = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        await self._app(scope, receive, send)
        return Answer(status, media_type, b"".join(chunks))


def problem_code(answer: Answer) -> str:
    """The stable ``code`` of a problem+json answer ("?" if it has none)."""
    try:
        body = json.loads(answer.body)
    except ValueError:
        return "?"
    code = body.get("code") if isinstance(body, dict) else None
    return str(code) if isinstance(code, str) else "?"
