"""Request ids, the access log, and the last line of defence against unexpected errors.

One pure ASGI middleware, outermost of the app's own:

- every request gets an id: the client's ``X-Request-ID`` when it is a plain token (letters,
  digits, ``-``, ``_``, ``.``, ``:``; at most 128), else a new UUID; it is answered in
  ``X-Request-ID`` and put on every log line written while the request runs
  (:data:`service.logs.request_id`);
- one access line per request: method, the route's template (``/models/{name}``, never the
  path a client typed, nor its query string), status and duration;
- an exception nothing else handled is logged as its type and where it was raised (its
  message may quote what the client sent) and answered with a 500 problem, inside the app:
  the server then neither logs the exception's text nor closes the keep-alive connection.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs
from service.api.paths import route_label
from service.api.problems import internal_error

log = logging.getLogger("medexplain.access")
errors_log = logging.getLogger("medexplain.errors")

HEADER: Final[str] = "x-request-id"
_TOKEN: Final[re.Pattern[bytes]] = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def _client_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == HEADER.encode() and _TOKEN.fullmatch(value):
            return value.decode("ascii")
    return None


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"


class RequestIdMiddleware:
    """See the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _client_id(scope) or uuid.uuid4().hex
        token = logs.request_id.set(rid)
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
                headers = [(k, v) for k, v in message.get("headers", ()) if k != HEADER.encode()]
                message = {**message, "headers": [*headers, (HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - the edge: nothing may escape to the server
            errors_log.error("unhandled %s at %s", type(exc).__qualname__, _where(exc))
            if not started:
                await internal_error(scope.get("path", ""))(scope, receive, send_with_id)
        finally:
            route = route_label(scope)
            duration = (time.perf_counter() - start) * 1000
            log.info("%s %s %d %.1f ms", scope.get("method", "?"), route, status, duration,
                     extra={"method": scope.get("method"), "route": route, "status": status,
                            "duration_ms": round(duration, 1)})
            logs.request_id.reset(token)
