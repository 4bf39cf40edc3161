"""Results out by C-STORE (``MEDEXPLAIN_DICOM_DESTINATION=AET@host:port``), over DICOM TLS
with ``MEDEXPLAIN_DICOM_DESTINATION_TLS``."""

from __future__ import annotations

import io
import logging
import ssl
import threading
import time
from collections.abc import Sequence

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association

from service.config import Settings
from service.dimse.base import Destination
from service.errors import DeliveryError
from service.tls import client_context

log = logging.getLogger(__name__)

# What /explain's DICOM outputs write: Secondary Capture, Comprehensive 3D SR, Grayscale
# Softcopy Presentation State, Segmentation.
SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34",
               "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.66.4")
# Every result can go uncompressed: Explicit VR Little Endian, and Implicit VR Little
# Endian beside it because it is the one every SCP must accept (PS3.5 §10.1); pynetdicom
# converts between the two. Results compressed (MEDEXPLAIN_DICOM_TRANSFER_SYNTAX) are
# proposed in their own syntax too, in a context of its own so that the destination can
# take it or leave it; one that leaves it gets them decompressed.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
STORED = (0x0000, 0xB000, 0xB006, 0xB007)  # success, and the three warnings (PS3.4 B.2.3)


class CStore(Destination):
    """One association per received image, one C-STORE per result."""

    def __init__(self, calling: str, called: str, host: str, port: int,
                 tls: ssl.SSLContext | None = None) -> None:
        self.name = f"{called}@{host}:{port}" + (" (TLS)" if tls is not None else "")
        self._calling, self._called, self._host, self._port = calling, called, host, port
        # pynetdicom's tls_args: the context, and the host name the certificate must name.
        self._tls_args = None if tls is None else (tls, host)

    @classmethod
    def from_settings(cls, settings: Settings) -> CStore | None:
        if settings.dicom_destination is None:
            return None
        called, _, address = settings.dicom_destination.partition("@")
        host, _, port = address.rpartition(":")
        tls = client_context(settings) if settings.dicom_destination_tls else None
        return cls(settings.dicom_ae_title, called, host, int(port), tls)

    def send(self, objects: Sequence[bytes], timeout_s: float) -> None:
        datasets = []
        for data in objects:
            try:
                datasets.append(dcmread(io.BytesIO(data)))
            except InvalidDicomError as exc:  # our own output: a bug, not the sender's
                raise DeliveryError(f"a result is not DICOM: {exc}") from exc
        needed = list(dict.fromkeys(str(ds.SOPClassUID) for ds in datasets))
        deadline = time.monotonic() + timeout_s
        # An AE per delivery: its timeouts are this delivery's, and deliveries of images
        # received on other associations run at the same time. Connecting and waiting for
        # the A-ASSOCIATE-AC share the first half of the time; the rest is bounded below.
        ae = AE(ae_title=self._calling)
        ae.connection_timeout = ae.acse_timeout = timeout_s / 2
        ae.dimse_timeout = ae.network_timeout = timeout_s
        for sop_class in SOP_CLASSES:
            ae.add_requested_context(sop_class, list(UNCOMPRESSED))
        compressed = _compressed(datasets)
        for sop_class, syntax in compressed:
            ae.add_requested_context(sop_class, [syntax])
        assoc = ae.associate(self._host, self._port, ae_title=self._called,
                             tls_args=self._tls_args)
        if not assoc.is_established:
            why = _why_not_associated(assoc, needed, tls=self._tls_args is not None)
            raise DeliveryError(f"{self.name} {why}")
        # A destination that stops answering mid-delivery is aborted at the deadline.
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), assoc.abort)
        watchdog.start()
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            refused = [uid for uid in needed if uid not in accepted]
            if refused:  # before sending any: a result is delivered whole or not at all
                raise DeliveryError(f"{self.name} does not take {_names(refused)} results "
                                    "(it refused their presentation context)")
            taken = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                     for cx in assoc.accepted_contexts}
            left = [pair for pair in compressed if pair not in taken]
            for sop_class, syntax in left:
                log.info("%s takes no %s %s: sent uncompressed", self.name,
                         UID(syntax).name, UID(sop_class).name)
            for dataset in datasets:
                if _key(dataset) in left:
                    dataset.decompress()  # pydicom's decoders; YCbCr becomes RGB
                status = assoc.send_c_store(dataset)
                code = getattr(status, "Status", None)
                if code is None and time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.name} had not stored the results in "
                                       f"{timeout_s:.1f} s")
                if code is None or code not in STORED:
                    shown = "no answer" if code is None else f"status 0x{code:04X}"
                    raise DeliveryError(f"{self.name} did not store a result ({shown})")
        finally:
            watchdog.cancel()
            if assoc.is_established:
                assoc.release()


def _key(dataset: Dataset) -> tuple[str, str]:
    """A dataset's (SOP Class, transfer syntax): the presentation context it needs."""
    return str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID)


def _compressed(datasets: Sequence[Dataset]) -> list[tuple[str, str]]:
    """The (SOP Class, transfer syntax) pairs of the datasets written compressed."""
    return list(dict.fromkeys(k for k in map(_key, datasets) if k[1] not in UNCOMPRESSED))


def _names(uids: Sequence[str]) -> str:
    return ", ".join(UID(uid).name for uid in uids)


def _why_not_associated(assoc: Association, needed: Sequence[str], *, tls: bool) -> str:
    if assoc.is_rejected:
        return "rejected the association"
    if assoc.is_aborted:
        # pynetdicom aborts when no presentation context was accepted.
        if not assoc.accepted_contexts and assoc.rejected_contexts:
            return f"accepted no presentation context for {_names(needed)} results"
        if not assoc.accepted_contexts:
            # No A-ASSOCIATE-AC at all: the connection failed before it. pynetdicom's own
            # log line has the reason, and the service's log withholds library text.
            if tls:
                return ("could not be reached, or the TLS handshake failed (its certificate "
                        "not signed by a CA in MEDEXPLAIN_TLS_CA, or ours refused)")
            return "could not be reached (connection refused or closed)"
        return "aborted the association"
    return "did not answer the association request"
