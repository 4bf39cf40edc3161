"""service.tls and the TLS settings: what a wrong certificate, key or CA file does to the
start (a clear refusal that names the setting and never quotes a file), and the contexts
the service builds from good ones."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from service.cli import main
from service.config import Settings, ValidationError
from service.errors import TlsError
from service.tls import client_context, server_context
from tests.tls_tools import Certificates, make_certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _own(certs: Certificates, **more: object) -> Settings:
    return Settings(tls_certfile=certs.service.cert, tls_keyfile=certs.service.key,
                    **more)  # type: ignore[arg-type]


def test_off_by_default() -> None:
    settings = Settings()
    assert server_context(settings) is None
    assert (settings.tls_certfile, settings.tls_keyfile, settings.tls_client_ca,
            settings.tls_ca, settings.dicom_destination_tls) == (None, None, None, None, False)


def test_the_server_context(certs: Certificates) -> None:
    context = server_context(_own(certs))
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    mutual = server_context(_own(certs, tls_client_ca=certs.ca))
    assert mutual is not None and mutual.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in mutual.get_ca_certs()] == [
        c["subject"] for c in certs.client().get_ca_certs()]


def test_the_client_context_trusts_tls_ca_alone(certs: Certificates) -> None:
    context = client_context(Settings(tls_ca=certs.stranger_ca))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1  # not the system's CAs besides
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(("settings", "message"), [
    ({"tls_certfile": "CERT"}, "tls_certfile and tls_keyfile are set together"),
    ({"tls_keyfile": "KEY"}, "tls_certfile and tls_keyfile are set together"),
    ({"tls_client_ca": "CA"}, "tls_client_ca needs tls_certfile and tls_keyfile"),
    ({"dicom_destination_tls": True}, "dicom_destination_tls needs dicom_destination"),
    ({"tls_ca": "missing.pem"}, "tls_ca is not a file"),
])
def test_incomplete_settings_are_refused(certs: Certificates, settings: dict[str, object],
                                         message: str) -> None:
    files = {"CERT": certs.service.cert, "KEY": certs.service.key, "CA": certs.ca}
    values = {k: files.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(ValidationError, match=message):
        Settings(**values)  # type: ignore[arg-type]


def _encrypted(certs: Certificates, folder: Path) -> Path:
    key = serialization.load_pem_private_key(certs.service.key.read_bytes(), None)
    path = folder / "encrypted.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    return path


@pytest.mark.parametrize(("case", "message"), [
    ("another's key", "tls_certfile and tls_keyfile cannot be used: key values mismatch"),
    ("encrypted key", "tls_keyfile is encrypted: give the service an unencrypted key"),
    ("key as certificate", "tls_certfile and tls_keyfile cannot be used: not a PEM file"),
    ("key as client CA", "tls_client_ca cannot be used: no certificate or crl found"),
])
def test_unusable_files_stop_the_start_with_the_reason(
        certs: Certificates, tmp_path: Path, case: str, message: str) -> None:
    settings = {
        "another's key": {"tls_keyfile": certs.pacs.key},
        "encrypted key": {"tls_keyfile": _encrypted(certs, tmp_path)},
        "key as certificate": {"tls_certfile": certs.service.key},
        "key as client CA": {"tls_client_ca": certs.service.key},
    }[case]
    with pytest.raises(TlsError, match=message):
        server_context(_own(certs).model_copy(update=settings))


def test_serve_refuses_a_bad_pair_before_loading_anything(
        certs: Certificates, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MEDEXPLAIN_TLS_CERTFILE", str(certs.service.cert))
    monkeypatch.setenv("MEDEXPLAIN_TLS_KEYFILE", str(certs.pacs.key))
    assert main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err == "medexplain: TLS: tls_certfile and tls_keyfile cannot be used: key values " \
                  "mismatch\n"
    assert "PRIVATE KEY" not in err and str(certs.pacs.key) not in err


def test_serve_ray_refuses_tls(certs: Certificates, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MEDEXPLAIN_TLS_CERTFILE", str(certs.service.cert))
    monkeypatch.setenv("MEDEXPLAIN_TLS_KEYFILE", str(certs.service.key))
    assert main(["serve", "--ray", "--port", "1"]) == 2
    assert "end TLS in front of the cluster" in capsys.readouterr().err
