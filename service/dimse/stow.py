"""Results out by STOW-RS (``MEDEXPLAIN_DICOM_STOW_URL``, a DICOMweb base URL), with
dicomweb-client; an https URL's server is verified against ``MEDEXPLAIN_TLS_CA`` (else the
system's CAs), and is shown the service's certificate when it has one."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from requests.adapters import HTTPAdapter

from service.config import Settings
from service.dimse.base import Destination
from service.errors import DeliveryError


class _Tls(HTTPAdapter):
    """The https side of a STOW-RS session: the server verified against ``ca`` when given
    (else requests' default), the service's certificate shown when it has one.

    Set on the adapter, not the session: requests lets REQUESTS_CA_BUNDLE and
    CURL_CA_BUNDLE replace a session's ``verify``, and MEDEXPLAIN_TLS_CA must win.
    requests takes file names, not an SSLContext: the files service.tls loads.
    """

    def __init__(self, ca: Path | None, own: tuple[Path, Path] | None) -> None:
        super().__init__()
        self._ca = None if ca is None else str(ca)
        self._own = None if own is None else (str(own[0]), str(own[1]))

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if self._ca is not None:
            kwargs["verify"] = self._ca
        if self._own is not None:
            kwargs["cert"] = self._own
        return super().send(request, **kwargs)


class Stow(Destination):
    """One STOW-RS request per received image, all its results in one multipart body."""

    def __init__(self, url: str, ca: Path | None = None,
                 own: tuple[Path, Path] | None = None) -> None:
        self.name = url
        self._url = url
        self._adapter = _Tls(ca, own)

    @classmethod
    def from_settings(cls, settings: Settings) -> Stow | None:
        if not settings.dicom_stow_url:
            return None
        return cls(settings.dicom_stow_url, settings.tls_ca, settings.tls_pair)

    def send(self, objects: Sequence[bytes], timeout_s: float) -> None:
        datasets = [dcmread(io.BytesIO(data)) for data in objects]
        # A client per delivery, for its timeout. requests bounds connecting and each wait
        # for bytes by it, not the whole exchange: a server trickling its answer is not cut.
        session = requests.Session()
        session.mount("https://", self._adapter)
        client = DICOMwebClient(url=self._url, session=session, timeout=timeout_s)
        # One attempt: dicomweb-client retries any exception up to 5 times, 30 s of
        # back-off outside this image's time budget (a PACS that is down, a refused
        # certificate); the sender is told, and may send the image again.
        client.set_http_retry_params(retry=False)
        try:
            answer = client.store_instances(datasets=datasets)
        except requests.exceptions.SSLError as exc:  # before ConnectionError, its base
            raise DeliveryError(f"{self.name}: the TLS handshake failed (its certificate not "
                                "signed by a CA in MEDEXPLAIN_TLS_CA, or ours refused)") from exc
        except requests.Timeout as exc:
            raise TimeoutError(f"{self.name} did not answer in {timeout_s:.1f} s") from exc
        except (requests.RequestException, OSError) as exc:
            raise DeliveryError(f"{self.name}: {type(exc).__name__}") from exc
        finally:
            session.close()
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise DeliveryError(f"{self.name} refused {len(failed)} result(s)")
