"""Results out by STOW-RS (``MEDEXPLAIN_DICOM_STOW_URL``, a DICOMweb base URL), with
dicomweb-client."""

from __future__ import annotations

import io
from collections.abc import Sequence

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from service.config import Settings
from service.dimse.base import Destination
from service.errors import DeliveryError


class Stow(Destination):
    """One STOW-RS request per received image, all its results in one multipart body."""

    def __init__(self, url: str) -> None:
        self.name = url
        self._url = url

    @classmethod
    def from_settings(cls, settings: Settings) -> Stow | None:
        return cls(settings.dicom_stow_url) if settings.dicom_stow_url else None

    def send(self, objects: Sequence[bytes], timeout_s: float) -> None:
        datasets = [dcmread(io.BytesIO(data)) for data in objects]
        # A client per delivery, for its timeout. requests bounds connecting and each wait
        # for bytes by it, not the whole exchange: a server trickling its answer is not cut.
        client = DICOMwebClient(url=self._url, timeout=timeout_s)
        try:
            answer = client.store_instances(datasets=datasets)
        except requests.Timeout as exc:
            raise TimeoutError(f"{self.name} did not answer in {timeout_s:.1f} s") from exc
        except (requests.RequestException, OSError) as exc:
            raise DeliveryError(f"{self.name}: {type(exc).__name__}") from exc
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise DeliveryError(f"{self.name} refused {len(failed)} result(s)")
