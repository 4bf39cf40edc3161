"""TLS: the contexts of the HTTPS API and the DICOM TLS SCP, and of the connections the
service makes (C-STORE over DICOM TLS, STOW-RS to https).

Both follow BCP 195 as DICOM's TLS profiles do (PS3.15 B.9): TLS 1.2 or later, with
Python's default cipher suites (forward-secret AEAD ciphers first, none of the weak ones).
The settings are ``tls_*`` (service.config); a bad file or a key that does not match its
certificate stops the start with :class:`TlsError`, naming the setting, never its contents.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from service.config import Settings
from service.errors import TlsError

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class ServerContext(ssl.SSLContext):
    """A server context whose sockets shake hands when first read, not when accepted.

    pynetdicom's server wraps each accepted socket in the thread that accepts them all
    (``AssociationServer.get_request``), and ``wrap_socket`` shakes hands there by default,
    with no time limit: one client that connected and said nothing stopped every other
    association. Deferred, the handshake happens in the connection's own thread on its first
    read (OpenSSL's SSL_read does it), inside the association's own timeouts. asyncio and
    uvloop (the HTTP side) use ``wrap_bio`` and are not affected.
    """

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_context(settings: Settings) -> ServerContext | None:
    """The context of the HTTPS and DICOM TLS listeners; None when TLS is off.

    Raises:
        TlsError: a certificate, key or CA file cannot be loaded.
    """
    if settings.tls_pair is None:
        return None
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_own(context, *settings.tls_pair)
    if settings.tls_client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        _load_cas(context, settings.tls_client_ca, "tls_client_ca")
    return context


def client_context(settings: Settings) -> ssl.SSLContext:
    """The context of the service's own connections: the server verified against
    ``tls_ca`` (or the system's CAs) and its host name checked; the service's certificate
    shown when it has one.

    Raises:
        TlsError: a certificate, key or CA file cannot be loaded.
    """
    if settings.tls_ca is None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        # These CAs only (a hospital's own), not every public one besides. A client
        # context verifies the server and checks its host name by default.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _load_cas(context, settings.tls_ca, "tls_ca")
    context.minimum_version = MINIMUM_VERSION
    if settings.tls_pair is not None:
        _load_own(context, *settings.tls_pair)
    return context


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt for the password on the terminal, and a
    # service has none to answer it.
    raise TlsError("tls_keyfile is encrypted: give the service an unencrypted key, "
                   "readable by the service's user only")


def _load_own(context: ssl.SSLContext, certfile: Path, keyfile: Path) -> None:
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except ssl.SSLError as exc:
        raise TlsError(f"tls_certfile and tls_keyfile cannot be used: {_why(exc)}") from exc
    except OSError as exc:
        raise TlsError(f"tls_certfile or tls_keyfile cannot be read: {exc.strerror}") from exc


def _load_cas(context: ssl.SSLContext, cafile: Path, name: str) -> None:
    try:
        context.load_verify_locations(cafile=cafile)
    except ssl.SSLError as exc:
        raise TlsError(f"{name} cannot be used: {_why(exc)}") from exc
    except OSError as exc:
        raise TlsError(f"{name} cannot be read: {exc.strerror}") from exc


def _why(exc: ssl.SSLError) -> str:
    """OpenSSL's reason (KEY_VALUES_MISMATCH, NO_START_LINE, ...), without file contents."""
    if not exc.reason:  # OpenSSL's "PEM lib": what was read is not what PEM should hold
        return "not a PEM file of the expected kind"
    return str(exc.reason).lower().replace("_", " ")


__all__ = ["MINIMUM_VERSION", "ServerContext", "client_context", "server_context"]
