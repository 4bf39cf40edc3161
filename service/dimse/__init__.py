"""DICOM networking: a C-STORE SCP that explains the images it receives and sends the
results on, by C-STORE or STOW-RS.

Started with the service when ``MEDEXPLAIN_DICOM_PORT`` is set (:func:`listening`, from the
app's lifespan). Each received image goes through the app's own ``POST /explain``, called
in process (:mod:`service.dimse.inprocess`), so it gets exactly what an HTTP client gets:
the same limits, guards, queue and outputs. The destinations, one module each, are
registered in :data:`DESTINATIONS`.

pynetdicom and dicomweb-client are the optional ``dicom`` extra: imported only when the
SCP is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from service.config import Settings
from service.errors import DicomServerError
from service.tls import server_context

if TYPE_CHECKING:
    from service.api.deps import State
    from service.dimse.base import Destination

log = logging.getLogger(__name__)


def _cstore(settings: Settings) -> Destination | None:
    from service.dimse.cstore import CStore

    return CStore.from_settings(settings)


def _stow(settings: Settings) -> Destination | None:
    from service.dimse.stow import Stow

    return Stow.from_settings(settings)


# Every way results leave the service; each returns None when not configured.
DESTINATIONS: tuple[Callable[[Settings], Destination | None], ...] = (_cstore, _stow)


@contextlib.asynccontextmanager
async def listening(settings: Settings, app: object, state: State) -> AsyncIterator[None]:
    """Run the C-STORE SCP for the body of the ``async with``, when ``dicom_port`` is set.

    Args:
        settings: the service settings (``dicom_*``).
        app: the ASGI app whose ``/explain`` explains what arrives.
        state: the lifespan state the app's routes read (``request.state``).

    Raises:
        DicomServerError: the ``dicom`` extra is not installed, or the port cannot be bound.
        TlsError: TLS is on (``tls_*``) and its files cannot be loaded.
    """
    if settings.dicom_port is None:
        yield
        return
    try:
        from service.dimse.inprocess import InProcess
        from service.dimse.scp import StoreServer
    except ImportError as exc:
        raise DicomServerError(f"MEDEXPLAIN_DICOM_PORT is set but the DICOM networking "
                               f"packages are missing (pip install 'medexplain[dicom]'): "
                               f"{exc}") from exc
    destinations = [d for d in (make(settings) for make in DESTINATIONS) if d is not None]
    client = InProcess(app, state, asyncio.get_running_loop(), settings)
    # DICOM TLS (PS3.15 B.9) on the same port when the service has a certificate.
    server = StoreServer(settings, client, destinations, state["metrics"],
                         server_context(settings))
    try:
        server.start()
    except OSError as exc:
        raise DicomServerError(
            f"the DICOM port {settings.dicom_port} cannot be opened: {exc}") from exc
    log.info("DICOM C-STORE SCP %s on %s:%d%s, results to %s", settings.dicom_ae_title,
             settings.host, settings.dicom_port,
             " (TLS)" if settings.tls_pair is not None else "",
             ", ".join(d.name for d in destinations) or "nowhere")
    try:
        yield
    finally:
        # Off the event loop: an association still explaining waits on the loop.
        await asyncio.to_thread(server.stop)


__all__ = ["DESTINATIONS", "listening"]
