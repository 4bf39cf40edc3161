"""The HTTP server: uvicorn with the timeouts it lacks and a drain on SIGTERM.

uvicorn bounds only the idle time between requests of a kept-alive connection. Two more
bounds live here, at the connection, where the app cannot see: the request head (line and
headers) must arrive within ``header_timeout_s`` (a connection that sends nothing, or
drips its headers, is closed), and SIGTERM drains (``/readyz`` answers 503 ``draining`` at
once, new uploads get 503, requests in progress finish within ``shutdown_timeout_s``, then
the process exits). The body's minimum rate and the request timeout are the app's
(service.api.body, service.api.admission). With TLS on (service.tls) the TLS handshake
gets ``header_timeout_s`` too, and the head's deadline starts once it is done.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from functools import partial
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from schemas import Problem
from service.api.admission import SECURITY_HEADERS, Admission
from service.api.problems import MEDIA_TYPE
from service.config import Settings

log = logging.getLogger(__name__)


def _timeout_answer() -> bytes:
    """The 408 for a head that came too slowly: problem+json with the security headers,
    as every other answer (written to the socket: no app sees this request)."""
    body = Problem(title="Request head too slow", status=408,
                   detail="the request line and headers did not arrive within "
                          "MEDEXPLAIN_HEADER_TIMEOUT_S", code="header_timeout"
                   ).model_dump_json().encode()
    head = [b"HTTP/1.1 408 Request Timeout", b"content-type: " + MEDIA_TYPE.encode(),
            b"content-length: %d" % len(body), *(k + b": " + v for k, v in SECURITY_HEADERS),
            b"connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


REQUEST_TIMEOUT_ANSWER = _timeout_answer()


class EdgeProtocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request head.

    The deadline starts when the connection opens, or with the first byte of the next
    request on a kept-alive one (the idle time before that byte is uvicorn's keep-alive
    timeout), and ends when h11 has the whole head.
    """

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # a head has begun (or nothing yet): keep its deadline
        else:
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(REQUEST_TIMEOUT_ANSWER)
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """On SIGTERM (or SIGINT), drain before uvicorn's own shutdown.

    While requests are in progress the listening socket stays open, so that load balancers
    and Kubernetes still reach ``/readyz`` (503 ``draining``) and new uploads are told to go
    elsewhere (503 ``draining``, ``Connection: close``); then uvicorn closes the listener and
    the connections, cancelling what is left when the timeout has passed.
    """

    def __init__(self, config: uvicorn.Config, admission: Admission, timeout: float,
                 handshake_timeout: float) -> None:
        super().__init__(config)
        self.admission = admission
        self.drain_timeout = timeout
        self.handshake_timeout = handshake_timeout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.config.is_ssl:
            # asyncio and uvloop give a TLS handshake 60 s, and the protocol (with the
            # head's deadline) sees the connection only once it is done: a client that
            # connected and said nothing held it six header timeouts. uvicorn has no
            # setting for it; the loop is this server's own.
            loop = asyncio.get_running_loop()
            loop.create_server = partial(  # type: ignore[method-assign]
                loop.create_server, ssl_handshake_timeout=self.handshake_timeout)
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.admission.start_drain()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        log.info("draining: %d request(s) in progress, %g s to finish", self.admission.in_flight,
                 self.drain_timeout)
        while self.admission.in_flight and not self.force_exit and loop.time() < deadline:
            await asyncio.sleep(0.05)
        # What is left of the timeout bounds uvicorn's wait for the connections.
        self.config.timeout_graceful_shutdown = max(0.5, deadline - loop.time())  # type: ignore[assignment]
        await super().shutdown(sockets)


def serve(app: Any, settings: Settings, admission: Admission,
          tls: ssl.SSLContext | None = None) -> None:
    """Run ``app`` on ``settings.host:port`` until SIGTERM/SIGINT, then drain and return;
    HTTPS with ``tls`` (service.tls.server_context)."""
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        # log_config=None: uvicorn's loggers go through service.logs; its access log (which
        # records query strings) is replaced by the service's own (service.api.request_id).
        log_config=None, access_log=False,
        http=partial(EdgeProtocol, header_timeout=settings.header_timeout_s),  # type: ignore[arg-type]
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        # No "server: uvicorn" banner: it tells an attacker what to look up.
        server_header=False,
        lifespan="on",
        ssl_context_factory=None if tls is None else lambda _config, _default: tls,
    )
    DrainingServer(config, admission, settings.shutdown_timeout_s,
                   handshake_timeout=settings.header_timeout_s).run()


__all__ = ["DrainingServer", "EdgeProtocol", "serve"]
