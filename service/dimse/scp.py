"""The C-STORE SCP: receives images, explains each through /explain, sends the results on.

One received image is handled inside its C-STORE, so the status the sender gets says what
became of it (PS3.4 B.2.3):

==========================  ==========  =============================================
/explain answered           status      meaning here
==========================  ==========  =============================================
200, results delivered      0x0000      explained, results sent to every destination
422 dicom_not_accepted,     0x0000      a valid image this model is not for (another
415 (no pixel data, ...)                modality or body part): taken, not explained
400 (bad DICOM)             0xC000      Error: cannot understand
406 (no valid Study or SOP  0xA900      Error: data set does not match SOP class (the
Instance UID, ...)                      results have no study to join, or a configured
                                        object cannot be made of the image)
413, 503                    0xA700      Refused: out of resources (the sender may retry)
anything else, a timeout    0x0110      processing failure
or a failed delivery
==========================  ==========  =============================================

Associations are accepted only when addressed to our AE title and, when
``dicom_allowed_callers`` is set, from one of those AE titles (else A-ASSOCIATE-RJ,
"calling AE title not recognised"). Logs name AE titles, statuses and problem codes, never
patient data or UIDs.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, Association, _config, evt
from pynetdicom.events import Event
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from service.api.metrics import Metrics
from service.config import Settings
from service.dimse.base import Destination
from service.dimse.inprocess import Answer, InProcess, problem_code
from service.errors import DeliveryError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
DATASET_MISMATCH = 0xA900
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0x0110

# What became of an image whose /explain was not a 200, by its status (the metrics' label).
_OUTCOMES = {SUCCESS: "not_explained", CANNOT_UNDERSTAND: "rejected",
             DATASET_MISMATCH: "rejected", OUT_OF_RESOURCES: "refused",
             PROCESSING_FAILURE: "failed"}
# Valid objects the service does not explain: their sender did nothing wrong.
NOT_EXPLAINED = frozenset({"dicom_not_accepted", "dicom_without_pixels",
                           "unsupported_transfer_syntax", "unsupported_media_type"})


def status_of(answer: Answer) -> int:
    """The C-STORE status for an /explain answer that is not a 200 (table above)."""
    if answer.status == 400:
        return CANNOT_UNDERSTAND
    if answer.status == 406:  # the SCP accepts any answer: only the image is lacking
        return DATASET_MISMATCH
    if answer.status in (413, 503):
        return OUT_OF_RESOURCES
    if problem_code(answer) in NOT_EXPLAINED:
        return SUCCESS
    return PROCESSING_FAILURE


def _left(deadline: float) -> float:
    """Seconds left before ``deadline``.

    Raises:
        TimeoutError: none.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


# How long stop() waits for connections still awaiting their A-ASSOCIATE-RQ to close.
_CLOSE_WAIT_S = 1.0


# Where A-ABORT is a valid event (pynetdicom's fsm, Evt15): an association requested or
# established. Sta1 (idle: a connection its thread has not handled yet, or one closing),
# Sta2 (awaiting the A-ASSOCIATE-RQ) and Sta13 (awaiting the close) are not.
_ABORTABLE = frozenset(f"Sta{n}" for n in range(3, 13))


def _state(assoc: Association) -> str:
    return str(assoc.dul.state_machine.current_state)


class StoreServer:
    """A pynetdicom AE listening on ``host:dicom_port`` as ``dicom_ae_title``."""

    def __init__(self, settings: Settings, client: InProcess,
                 destinations: Sequence[Destination], metrics: Metrics,
                 tls: ssl.SSLContext | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._tls = tls
        self._client = client
        self._destinations = list(destinations)
        self._server: ThreadedAssociationServer | None = None
        ae = AE(ae_title=settings.dicom_ae_title)
        # Storage of every image type, in any transfer syntax the decoders may read (the
        # route answers 415 for one they cannot).
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, AllTransferSyntaxes)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        ae.require_calling_aet = list(settings.dicom_allowed_callers)
        self._ae = ae

    def start(self) -> None:
        # pynetdicom would log C-FIND/C-MOVE identifiers (patient data) at debug level; we
        # serve only C-STORE and C-ECHO, and keep its own logging at warnings all the same.
        _config.LOG_REQUEST_IDENTIFIERS = False
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        self._server = self._ae.start_server(
            (self._settings.host, self._settings.dicom_port), block=False,
            ssl_context=self._tls, evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                          (evt.EVT_REJECTED, self._on_rejected)])

    def stop(self) -> None:
        """Stop listening, then end every connection.

        pynetdicom's shutdown sends each association an A-ABORT, which is no event of a
        connection still waiting for its A-ASSOCIATE-RQ (state Sta2: a port check, a peer
        that connected and said nothing): its thread raised InvalidEventError and left the
        socket open. Such a connection gets its request timer (ARTIM) expired instead, the
        state machine's own way out of Sta2 (it closes the transport), before the rest are
        aborted. Only associations get the A-ABORT: on a busy machine a connection
        accepted just before the server stopped can still be in Sta1, its thread not yet
        having handled it (a CI run and a test run beside three busy processes failed on
        this); its timer of 0 expires as soon as Sta2 starts it.
        """
        if self._server is not None:
            self._server.shutdown()  # no new connections; each accepted one has its thread
            self._server = None
        deadline = time.monotonic() + _CLOSE_WAIT_S
        while True:
            unassociated = [a for a in self._ae.active_associations
                            if _state(a) not in _ABORTABLE]
            for assoc in unassociated:
                assoc.dul.artim_timer.timeout = 0
            if (not any(_state(a) == "Sta2" for a in unassociated)
                    or time.monotonic() >= deadline):
                break
            time.sleep(0.01)
        for assoc in self._ae.active_associations:
            if _state(assoc) in _ABORTABLE:
                assoc.abort()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def _on_rejected(self, event: Event) -> None:
        """Log why an association was refused (pynetdicom's own line says only that)."""
        calling = event.assoc.requestor.ae_title
        called = event.assoc.requestor.primitive.called_ae_title
        if self._ae.require_calling_aet and calling not in self._ae.require_calling_aet:
            reason, why = "calling_ae_title", "calling AE title not allowed"
        elif called != self._ae.ae_title:
            reason, why = "called_ae_title", f"called AE title {called} is not ours"
        else:
            reason = "association_limit"
            why = f"{self._ae.maximum_associations} associations already open"
        self._metrics.dicom_rejected.labels(reason).inc()
        log.warning("association from %s rejected: %s", calling, why)

    def _on_store(self, event: Event) -> int:
        calling = event.assoc.requestor.ae_title
        started = time.monotonic()
        dicom = event.encoded_dataset(include_meta=True)
        try:
            status, outcome, what = self._handle(dicom)
        except TimeoutError as exc:
            limit = f"timed out after {self._settings.dicom_timeout_s:g} s"
            status, outcome = PROCESSING_FAILURE, "timed_out"
            what = f"{limit}: {exc}" if str(exc) else limit
        except DeliveryError as exc:
            status, outcome = PROCESSING_FAILURE, "not_delivered"
            what = f"not delivered: {exc.detail}"
        self._metrics.dicom_stores.labels(f"0x{status:04X}", outcome).inc()
        log.info("C-STORE from %s: 0x%04X %s (%.1f s)", calling, status, what,
                 time.monotonic() - started)
        return status

    def _handle(self, dicom: bytes) -> tuple[int, str, str]:
        """The C-STORE status, the outcome (the metrics' label) and what to log."""
        # One budget for the image: every explanation and every delivery.
        deadline = time.monotonic() + self._settings.dicom_timeout_s
        # Every output from one explanation (dicom=sc,sr: multipart/related).
        answer = self._client.explain(dicom, ",".join(self._settings.dicom_outputs),
                                      _left(deadline))
        if answer.status != 200:
            status = status_of(answer)
            return (status, _OUTCOMES[status],
                    f"not explained: HTTP {answer.status} {problem_code(answer)}")
        objects = answer.objects()
        for destination in self._destinations:
            self._deliver(destination, objects, deadline)
        names = ", ".join(d.name for d in self._destinations) or "nowhere"
        return SUCCESS, "explained", f"explained: {len(objects)} object(s) to {names}"

    def _deliver(self, destination: Destination, objects: list[bytes],
                 deadline: float) -> None:
        started = time.monotonic()
        outcome = "failed"
        try:
            destination.send(objects, _left(deadline))
            outcome = "delivered"
        except TimeoutError:
            outcome = "timed_out"
            raise
        finally:
            self._metrics.dicom_deliveries.labels(destination.name, outcome).inc()
            self._metrics.dicom_delivery_latency.labels(destination.name).observe(
                time.monotonic() - started)
