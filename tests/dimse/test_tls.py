"""DICOM TLS (PS3.15 Annex B) end to end: DCMTK's ``storescu +tls`` sends a radiograph to
the service's SCP, which asks for the modality's certificate, and the results go on to
Orthanc over DICOM TLS (C-STORE) or to its DICOMweb over https (STOW-RS), each side
verifying the other against the hospital's CA (tests/tls_tools.py).
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from service.config import Settings
from service.main import create_app
from tests.api.conftest import DATA, MODELS, explanations_computed
from tests.dicom_tools import dcmtk, fresh_copy
from tests.orthanc_tools import PLUGINS, free_port, orthanc, study_instances, wait_for_port
from tests.tls_tools import Certificates, Pair, make_certificates

pytestmark = [pytest.mark.slow]

STORESCU = dcmtk("storescu")
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
ORTHANC_AET = "ORTHANC"
SENDER = "MODALITY1"
PHANTOM = DATA / "dicom" / "phantom_nodule.dcm"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def pacs(certs: Certificates,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """Orthanc with DICOM TLS, client certificates required: (REST URL, DICOM port)."""
    dicom_port = free_port()
    config = {"Name": "medexplain-tls-test", "DicomServerEnabled": True,
              "DicomAet": ORTHANC_AET, "DicomPort": dicom_port,
              "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": True,
              "DicomTlsEnabled": True, "DicomTlsCertificate": str(certs.pacs.cert),
              "DicomTlsPrivateKey": str(certs.pacs.key),
              "DicomTlsTrustedCertificates": str(certs.ca),
              "DicomTlsRemoteCertificateRequired": True,
              "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so")],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    with orthanc(tmp_path_factory.mktemp("orthanc"), config) as (url, _log):
        yield url, dicom_port


@pytest.fixture(scope="module")
def https_dicomweb(certs: Certificates, pacs: tuple[str, int],
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Orthanc's DICOMweb behind stunnel, which ends TLS and asks for a client certificate
    from the hospital's CA: its https base URL."""
    assert STUNNEL is not None, "stunnel is not installed: `bash scripts/system-deps.sh`"
    folder = tmp_path_factory.mktemp("stunnel")
    port = free_port()
    orthanc_port = int(pacs[0].rsplit(":", 1)[1])
    (folder / "stunnel.conf").write_text(f"""\
foreground = yes
pid =
[dicomweb]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{orthanc_port}
cert = {certs.pacs.cert}
key = {certs.pacs.key}
CAfile = {certs.ca}
verifyChain = yes
requireCert = yes
""")
    with (folder / "stunnel.log").open("wb") as log:
        process = subprocess.Popen([STUNNEL, str(folder / "stunnel.conf")], stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, "stunnel")
        yield f"https://127.0.0.1:{port}/dicom-web"
    finally:
        process.kill()
        process.wait(timeout=10)


def _service(certs: Certificates, **settings: object) -> Iterator[tuple[TestClient, int]]:
    config = Settings(models=MODELS, threads=1, dicom_port=free_port(),
                      tls_certfile=certs.service.cert, tls_keyfile=certs.service.key,
                      tls_client_ca=certs.ca, dicom_allowed_callers=(SENDER,),
                      dicom_query="methods=gradcam", **settings)  # type: ignore[arg-type]
    with TestClient(create_app(config)) as client:
        yield client, config.dicom_port  # type: ignore[misc]


@pytest.fixture(scope="module")
def by_cstore(certs: Certificates,
              pacs: tuple[str, int]) -> Iterator[tuple[TestClient, int]]:
    """The SCP over TLS, capture and report to Orthanc by C-STORE over DICOM TLS."""
    yield from _service(certs, tls_ca=certs.ca, dicom_outputs=("sc", "sr"),
                        dicom_destination=f"{ORTHANC_AET}@127.0.0.1:{pacs[1]}",
                        dicom_destination_tls=True)


def _storescu(port: int, path: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    assert STORESCU is not None, "DCMTK is not installed: `bash scripts/system-deps.sh`"
    return subprocess.run([STORESCU, "-v", "-aet", SENDER, "-aec", "MEDEXPLAIN", *tls,
                           "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=120, check=False)


def _with_certificate(pair: Pair, ca: Path) -> tuple[str, ...]:
    """storescu's options for TLS with ``pair`` as its certificate, trusting ``ca``."""
    return ("+tls", str(pair.key), str(pair.cert), "+cf", str(ca))


def _responses(result: subprocess.CompletedProcess[str]) -> list[str]:
    return re.findall(r"Received Store Response \((.*)\)", result.stdout + result.stderr)


def _scp_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "service.dimse.scp"]


def test_a_radiograph_over_tls_comes_back_from_the_pacs_over_tls(
        certs: Certificates, pacs: tuple[str, int], by_cstore: tuple[TestClient, int],
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client, port = by_cstore
    caplog.set_level(logging.INFO, logger="service.dimse.scp")
    path, source = fresh_copy(PHANTOM, tmp_path)
    result = _storescu(port, path, *_with_certificate(certs.modality, certs.ca))
    assert result.returncode == 0 and _responses(result) == ["Success"], result.stdout
    (line,) = _scp_lines(caplog)
    assert re.fullmatch(rf"C-STORE from {SENDER}: 0x0000 explained: 2 object\(s\) to "
                        rf"{ORTHANC_AET}@127.0.0.1:{pacs[1]} \(TLS\) \(\d+\.\d s\)", line), line
    arrived = study_instances(pacs[0], source.StudyInstanceUID)
    assert sorted(str(d.SOPClassUID) for d in arrived) == sorted(
        [SecondaryCaptureImageStorage, Comprehensive3DSRStorage])
    (capture,) = [d for d in arrived if d.SOPClassUID == SecondaryCaptureImageStorage]
    # The same capture an HTTP client gets for the file.
    r = client.post("/explain", content=path.read_bytes(), params={"methods": "gradcam"},
                    headers={"content-type": "application/dicom", "accept": "application/dicom"})
    assert r.status_code == 200, r.text
    expected = pydicom.dcmread(io.BytesIO(r.content))
    np.testing.assert_array_equal(capture.pixel_array, expected.pixel_array)
    assert capture.StudyInstanceUID == source.StudyInstanceUID


def test_results_by_stow_rs_to_an_https_dicomweb_that_asks_for_our_certificate(
        certs: Certificates, pacs: tuple[str, int], https_dicomweb: str,
        tmp_path: Path) -> None:
    path, source = fresh_copy(PHANTOM, tmp_path)
    for client, port in _service(certs, tls_ca=certs.ca, dicom_stow_url=https_dicomweb):
        result = _storescu(port, path, *_with_certificate(certs.modality, certs.ca))
        assert result.returncode == 0 and _responses(result) == ["Success"], result.stdout
    (capture,) = study_instances(pacs[0], source.StudyInstanceUID)
    assert capture.SOPClassUID == SecondaryCaptureImageStorage
    assert capture.SeriesNumber == 9913  # gradcam


@pytest.mark.parametrize("destination", ["cstore", "stow"])
def test_a_destination_whose_certificate_we_do_not_trust_gets_nothing(
        destination: str, certs: Certificates, pacs: tuple[str, int], https_dicomweb: str,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Trusting another CA (MEDEXPLAIN_TLS_CA), the service refuses the PACS's certificate:
    the sender is told the image failed, and the log says why."""
    caplog.set_level(logging.INFO, logger="service.dimse.scp")
    where: dict[str, object] = (
        {"dicom_destination": f"{ORTHANC_AET}@127.0.0.1:{pacs[1]}",
         "dicom_destination_tls": True} if destination == "cstore"
        else {"dicom_stow_url": https_dicomweb})
    path, source = fresh_copy(PHANTOM, tmp_path)
    for _client, port in _service(certs, tls_ca=certs.stranger_ca, **where):
        result = _storescu(port, path, *_with_certificate(certs.modality, certs.ca))
    assert _responses(result) == ["Unknown Status: 0x110"], result.stdout + result.stderr
    (line,) = _scp_lines(caplog)
    why = ("could not be reached, or the TLS handshake failed"
           if destination == "cstore" else "the TLS handshake failed")
    assert "0x0110 not delivered:" in line and why in line, line
    assert study_instances(pacs[0], source.StudyInstanceUID) == []


def test_a_peer_that_connected_and_said_nothing_does_not_hold_the_others(
        certs: Certificates, by_cstore: tuple[TestClient, int], tmp_path: Path) -> None:
    """pynetdicom shakes hands in the thread that accepts every connection: a client that
    never sent its TLS ClientHello stopped the SCP until it left."""
    _, port = by_cstore
    path, _ = fresh_copy(PHANTOM, tmp_path)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        started = time.monotonic()
        result = _storescu(port, path, "-to", "20",
                           *_with_certificate(certs.modality, certs.ca))
        took = time.monotonic() - started
    assert result.returncode == 0 and _responses(result) == ["Success"], result.stdout
    assert took < 15, took


@pytest.mark.parametrize(("options", "why"), [
    ((), "plain TCP to a TLS port"),
    (("+tla",), "TLS without a certificate"),
    (("stranger",), "a certificate from a CA the service does not trust"),
])
def test_senders_without_a_trusted_certificate_are_refused(
        options: tuple[str, ...], why: str, certs: Certificates, pacs: tuple[str, int],
        by_cstore: tuple[TestClient, int], tmp_path: Path) -> None:
    client, port = by_cstore
    path, source = fresh_copy(PHANTOM, tmp_path)
    if options == ("stranger",):
        options = _with_certificate(certs.stranger, certs.ca)
    elif options == ("+tla",):
        options = ("+tla", "+cf", str(certs.ca))
    before = explanations_computed(client)
    result = _storescu(port, path, "-to", "10", *options)
    assert result.returncode != 0 and _responses(result) == [], (why, result.stdout)
    assert explanations_computed(client) == before, why
    assert study_instances(pacs[0], source.StudyInstanceUID) == []
