"""Results out by C-STORE (``MEDEXPLAIN_DICOM_DESTINATION=AET@host:port``)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from service.config import Settings
from service.dimse.base import Destination
from service.errors import DeliveryError

# What /explain's DICOM outputs write: Secondary Capture, Comprehensive 3D SR.
SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34")


class CStore(Destination):
    """One association per received image, one C-STORE per result."""

    def __init__(self, calling: str, called: str, host: str, port: int) -> None:
        self.name = f"{called}@{host}:{port}"
        self._called, self._host, self._port = called, host, port
        self._ae = AE(ae_title=calling)
        for sop_class in SOP_CLASSES:
            self._ae.add_requested_context(sop_class, ExplicitVRLittleEndian)

    @classmethod
    def from_settings(cls, settings: Settings) -> CStore | None:
        if settings.dicom_destination is None:
            return None
        called, _, address = settings.dicom_destination.partition("@")
        host, _, port = address.rpartition(":")
        return cls(settings.dicom_ae_title, called, host, int(port))

    def send(self, objects: Sequence[bytes]) -> None:
        assoc = self._ae.associate(self._host, self._port, ae_title=self._called)
        if not assoc.is_established:
            raise DeliveryError(f"{self.name} refused or did not answer the association")
        try:
            for data in objects:
                try:
                    dataset = dcmread(io.BytesIO(data))
                except InvalidDicomError as exc:  # our own output: a bug, not the sender's
                    raise DeliveryError(f"a result is not DICOM: {exc}") from exc
                status = assoc.send_c_store(dataset)
                code = getattr(status, "Status", None)
                if code is None or code not in (0x0000, 0xB000, 0xB006, 0xB007):
                    shown = "no answer" if code is None else f"status 0x{code:04X}"
                    raise DeliveryError(f"{self.name} did not store a result ({shown})")
        finally:
            assoc.release()
