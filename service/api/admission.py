"""Admission at the HTTP edge: each upload is admitted, or refused, before its body is read.

A request's headers tell everything the decision needs: its declared size, and (once the
routes' API-key dependency has run) who sent it. :func:`admit`, called by
:func:`service.api.body.read_body` right before the first byte of the body is read, refuses
an upload that is over the byte cap (413) and, while the edge already holds its budget of
requests or bytes in flight, or drains for a shutdown, answers 503 + Retry-After. The
compute queue (``runtime``) comes after this and has its own bound; the edge bounds what
uploads make the process *hold*, which the queue cannot, since bodies are read before work
is queued.

:class:`EdgeMiddleware` (pure ASGI, just inside the metrics) owns the per-request
bookkeeping:

* what an upload reserved is given back when its work really ends, not when its answer is
  sent (a timed-out request whose compute goes on still holds its memory);
* an answer sent before the request's body was wholly received closes the connection
  (``Connection: close``) instead of letting the server drain what the client still sends;
* the request timeout: from the end of the body to the start of the answer;
* a request whose client disconnects before its answer starts is abandoned: its queued
  work is dropped, not computed for nobody;
* security headers on every answer, API keys for /metrics and /docs when configured;
* the count of requests in progress that a drain waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Iterable, Mapping

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.paths import DOCS, METRICS
from service.api.problems import response_for
from service.config import Settings
from service.errors import (
    ComputeTimeout,
    Draining,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
)

log = logging.getLogger(__name__)

# Where the middleware leaves a request's Exchange in its ASGI scope.
EXCHANGE = "medexplain.exchange"
# Set in the ASGI scope of a request whose client went away before its answer started.
ABANDONED = "medexplain.abandoned"

# Probes a drain does not wait for (they are answered at once, and a load balancer polls
# /readyz throughout the drain).
PROBES = frozenset({"/healthz", "/readyz"})

# Headers every answer carries unless its route set them: no content sniffing, and nothing
# kept by caches (answers are about patients' images; /models and the rest are cheap).
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
)
# Over HTTPS: a browser that has been here uses HTTPS for a year, never plain HTTP.
HSTS = (b"strict-transport-security", b"max-age=31536000")


class Admission:
    """The edge's budget: uploads and bytes in flight, and whether the service drains."""

    def __init__(self, settings: Settings) -> None:
        # The same bound the compute queue applies, applied before the body is read.
        self.max_requests = settings.max_concurrency + settings.max_queue
        self.max_bytes = settings.max_inflight_bytes
        self.max_upload = settings.max_upload_bytes
        self.requests = 0
        self.bytes = 0
        self.in_flight = 0  # requests in progress, probes excluded: what a drain waits for
        self.draining = False

    def is_overloaded(self) -> bool:
        return self.requests >= self.max_requests or self.bytes >= self.max_bytes

    def start_drain(self) -> None:
        """From now on /readyz answers 503 draining and new uploads are refused (called from
        a signal handler: it only sets a flag)."""
        self.draining = True


class Exchange:
    """One request and its answer, as the edge sees them."""

    def __init__(self, admission: Admission, scope: Scope) -> None:
        self.admission = admission
        self.headers = {k.lower(): v for k, v in scope["headers"]}
        self.reserved = 0
        self.admitted = False
        self.dropped = False
        # The app has read the whole body (through the middleware's receive).
        self.body_read = False
        # A request the server had before the drain began is in flight: it may finish.
        self.after_drain = admission.draining
        # Futures, not Events: asyncio.wait() takes them as they are, with no helper task.
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = loop.create_future()
        self.body_done: asyncio.Future[None] = loop.create_future()
        # No Content-Length and no Transfer-Encoding: HTTP/1.1 says there is no body.
        length = self.headers.get(b"content-length")
        if b"transfer-encoding" not in self.headers and (length is None or length == b"0"):
            self.body_done.set_result(None)

    def declared_length(self) -> int | None:
        value = self.headers.get(b"content-length")
        # The HTTP parser has already refused malformed values; digits only here.
        return int(value) if value is not None and value.isdigit() else None

    def admit(self) -> None:
        """Reserve room for this request's body, or refuse it before a byte is read.

        Raises:
            Draining: the request came after the drain began (SIGTERM).
            PayloadTooLarge: the declared body is over max_upload_bytes.
            Overloaded: the edge holds its budget of uploads or bytes already.
        """
        adm = self.admission
        if self.after_drain:
            raise Draining("the service is shutting down; retry on another instance",
                           retry_after_s=1)
        declared = self.declared_length()
        if declared is not None and declared > adm.max_upload:
            raise PayloadTooLarge(
                f"the body has {declared} bytes; the limit is {adm.max_upload}")
        # A chunked body may grow up to the cap, and a compressed one inflates up to it
        # (service.api.body.inflate): those are counted at the cap. A 64 KB gzip body of
        # 64 MB counted at its length let every admitted upload hold 1,000 times its share.
        encoding = self.headers.get(b"content-encoding", b"").decode("latin-1")
        compressed = content_coding(encoding) != "identity"
        need = declared if declared is not None and not compressed else adm.max_upload
        if adm.requests >= adm.max_requests or adm.bytes + need > adm.max_bytes:
            raise Overloaded(
                f"{adm.requests} uploads ({adm.bytes} bytes) are in progress; retry shortly",
                retry_after_s=1)
        adm.requests += 1
        adm.bytes += need
        self.reserved = need
        self.admitted = True

    def finish(self) -> None:
        """The request's work has ended: give back what it held."""
        if self.admitted:
            self.admission.requests -= 1
            self.admission.bytes -= self.reserved
            self.admitted = False


def content_coding(header: str | None) -> str:
    """A Content-Encoding value as compared: lower case, "identity" when absent or empty,
    and "x-gzip" as "gzip" (a recipient SHOULD take it so, RFC 9110 section 8.4.1.3)."""
    name = (header or "").strip().lower() or "identity"
    return "gzip" if name == "x-gzip" else name


def given_key(headers: Mapping[bytes, bytes]) -> bytes | None:
    """The API key a request carries: ``X-API-Key: k`` or ``Authorization: Bearer k``."""
    given = headers.get(b"x-api-key")
    auth = headers.get(b"authorization", b"")
    if given is None and auth[:7].lower() == b"bearer ":
        given = auth[7:].strip()
    return given


def key_error(given: bytes | None, keys: tuple[str, ...]) -> Unauthorized | None:
    """Why a request carrying ``given`` may not pass (None: it may); constant-time."""
    if not keys:
        return None
    if given is None:
        return Unauthorized("this service needs an API key (X-API-Key or Authorization: Bearer)")
    if not any(hmac.compare_digest(given, k.encode()) for k in keys):
        return Unauthorized("the API key is not valid")
    return None


def admit(request: Request) -> None:
    """Admit ``request``'s body (see :meth:`Exchange.admit`); call before reading it."""
    exchange: Exchange = request.scope[EXCHANGE]  # create_app always installs the middleware
    exchange.admit()


def _with_headers(headers: Iterable[tuple[bytes, bytes]],
                  extra: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    out = list(headers)
    present = {k.lower() for k, _ in out}
    out += [(k, v) for k, v in extra if k not in present]
    return out


class EdgeMiddleware:
    """The edge's ASGI layer: see the module docstring."""

    def __init__(self, app: ASGIApp, admission: Admission, settings: Settings) -> None:
        self.app = app
        self.admission = admission
        self.request_timeout = settings.request_timeout_s
        self.keys = settings.api_keys
        protected: set[str] = set()
        if settings.api_keys and settings.protect_metrics:
            protected.add(METRICS)
        if settings.api_keys and settings.protect_docs:
            protected |= DOCS
        self.protected = frozenset(protected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = Exchange(self.admission, scope)
        scope[EXCHANGE] = exchange
        probe = scope["path"] in PROBES
        if not probe:
            self.admission.in_flight += 1
        try:
            await self._exchange(exchange, scope, receive, send)
        finally:
            if not probe:
                self.admission.in_flight -= 1

    async def _exchange(self, exchange: Exchange, scope: Scope, receive: Receive,
                        send: Send) -> None:
        async def edge_receive() -> Message:
            message = await receive()
            if (message["type"] == "http.disconnect" or not message.get("more_body", False)) \
                    and not exchange.body_done.done():
                exchange.body_read = message["type"] == "http.request"
                if not exchange.body_read:
                    # Gone before the whole body came: the app's 400 reaches nobody.
                    scope[ABANDONED] = True
                exchange.body_done.set_result(None)
            return message

        async def own_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if scope.get("scheme") == "https":  # MEDEXPLAIN_TLS_*: browsers stay on it
                    extra.append(HSTS)
                # Answered before the whole body arrived (413, 401, 503, ...), or draining:
                # close rather than read (and discard) what the client still sends.
                if not exchange.body_done.done() or self.admission.draining:
                    extra.append((b"connection", b"close"))
                message = {**message, "headers": _with_headers(message.get("headers", []),
                                                               extra)}
                if not exchange.started.done():
                    exchange.started.set_result(None)
            await send(message)

        async def edge_send(message: Message) -> None:
            if not exchange.dropped:  # after a timeout the edge has answered
                await own_send(message)

        if scope["path"] in self.protected:
            error = key_error(given_key(exchange.headers), self.keys)
            if error is not None:
                await _answer(error, scope, receive, own_send)
                return

        inner = asyncio.ensure_future(self.app(scope, edge_receive, edge_send))
        inner.add_done_callback(lambda task: _ended(task, exchange))
        gone: asyncio.Future[None] | None = None
        try:
            # The request timeout runs from the end of the body to the start of the answer.
            await asyncio.wait({inner, exchange.body_done}, return_when=asyncio.FIRST_COMPLETED)
            if not inner.done():
                # Only once the app has read a body: before that (a request without one)
                # receive() still holds the request's own message, which the app may read.
                if exchange.body_read:
                    gone = asyncio.ensure_future(_disconnect(receive))
                await asyncio.wait({inner, exchange.started, *([gone] if gone else [])},
                                   timeout=self.request_timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            if gone is not None and not gone.done():
                gone.cancel()  # the answer has started (or timed out): nothing to watch
            if inner.done() or exchange.started.done():
                await inner  # the app's own exception, if any, goes on up
                return
            if gone is not None and gone.done():
                await _abandon(inner, scope)
                return
        except asyncio.CancelledError:  # the server's graceful-shutdown timeout
            inner.cancel()
            if gone is not None:
                gone.cancel()
            raise
        # The compute cannot be interrupted (it runs in a thread); it goes on and its answer
        # is dropped, while what it holds stays counted until it ends (_ended).
        error = ComputeTimeout(
            f"no answer within the request timeout of {self.request_timeout:g} s; retry "
            "shortly", retry_after_s=1)
        exchange.dropped = True
        await _answer(error, scope, receive, own_send)


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has gone (called once the request's body is all read: from
    then on the server's receive() has nothing to give but the disconnect; it also gives
    one once the answer is complete, which the caller tells apart by the answer's start)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _abandon(inner: asyncio.Future[None], scope: Scope) -> None:
    """Stop the work of a request whose client went away before its answer started.

    Nobody is left to read the answer, and a client that timed out and retried (or a load
    generator stopping with requests in flight) would otherwise leave its work queued ahead
    of everyone else's: 16 abandoned DenseNet-121 requests held the server for ~0.6 s and
    their admission places made the next client's first requests 503. The request's queued
    compute is dropped; work already running in a thread ends first (its memory stays
    counted until then: service.runtime.worker.ComputeStream.run). The metrics count it as
    status 499, nginx's "client closed request".
    """
    scope[ABANDONED] = True
    inner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await inner


def _ended(task: asyncio.Task[None], exchange: Exchange) -> None:
    exchange.finish()
    if not task.cancelled() and task.exception() is not None and exchange.dropped:
        # Dropped work's failure has no client left to tell; the type only (no message:
        # it may quote the upload).
        log.warning("a timed-out request's work failed afterwards (%s)",
                    type(task.exception()).__name__)


async def _answer(error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
    await response_for(error, scope.get("path", ""))(scope, receive, send)


__all__ = ["ABANDONED", "EXCHANGE", "Admission", "EdgeMiddleware", "Exchange", "admit", "given_key", "key_error"]
