"""The HTTP API over TLS (MEDEXPLAIN_TLS_CERTFILE / KEYFILE, service.tls): a real
``medexplain serve`` with a certificate from a test CA (tests/tls_tools.py), reached with
httpx and raw TLS sockets; with MEDEXPLAIN_TLS_CLIENT_CA, clients need a certificate."""

from __future__ import annotations

import socket
import ssl
import time
import warnings
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.api.conftest import DATA, MODELS
from tests.api.live import Live, closed_by_peer, live_server, read_response
from tests.tls_tools import Certificates, make_certificates

pytestmark = [pytest.mark.slow]

HEADER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def https(certs: Certificates) -> Iterator[Live]:
    with live_server(tls=certs.client(), tls_certfile=str(certs.service.cert),
                     tls_keyfile=str(certs.service.key),
                     header_timeout_s=str(HEADER_TIMEOUT_S)) as live:
        yield live


@pytest.fixture(scope="module")
def mutual(certs: Certificates) -> Iterator[Live]:
    """Client certificates from the hospital's CA required."""
    with live_server(tls=certs.client(certs.modality), tls_certfile=str(certs.service.cert),
                     tls_keyfile=str(certs.service.key),
                     tls_client_ca=str(certs.ca)) as live:
        yield live


def test_an_explanation_over_https_is_the_one_over_plain_http(
        https: Live, certs: Certificates) -> None:
    image = (DATA / "phantoms" / "nodule.png").read_bytes()
    params = {"methods": "gradcam,crm"}
    with httpx.Client(verify=certs.client(), timeout=60) as client:
        r = client.post(f"https://127.0.0.1:{https.port}/explain", params=params,
                        files={"file": ("nodule.png", image, "image/png")})
    assert r.status_code == 200, r.text
    # Browsers that have been here keep to HTTPS.
    assert r.headers["strict-transport-security"] == "max-age=31536000"
    with TestClient(create_app(Settings(models=MODELS, threads=1))) as plain:
        want = plain.post("/explain", params=params,
                          files={"file": ("nodule.png", image, "image/png")})
    assert "strict-transport-security" not in want.headers
    got, expected = r.json(), want.json()
    assert got["predictions"] == expected["predictions"]
    assert [(e["method"], e["index"], e["heatmap"]["data"], e["regions"])
            for e in got["explanations"]] == [
        (e["method"], e["index"], e["heatmap"]["data"], e["regions"])
        for e in expected["explanations"]]


def test_plain_http_to_the_https_port_gets_no_answer(https: Live) -> None:
    with socket.create_connection(("127.0.0.1", https.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        s.settimeout(10)
        try:
            answer = s.recv(65536)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer[:60]


def test_a_connection_that_never_starts_its_handshake_is_closed_at_the_header_timeout(
        https: Live) -> None:
    """asyncio and uvloop wait 60 s for a TLS handshake by default, and the head's own
    deadline starts only after it."""
    with socket.create_connection(("127.0.0.1", https.port), timeout=10) as s:
        started = time.monotonic()
        assert closed_by_peer(s, HEADER_TIMEOUT_S + 4)
        took = time.monotonic() - started
    assert HEADER_TIMEOUT_S - 0.2 < took < HEADER_TIMEOUT_S + 4, took
    assert https.get("/healthz")[0] == 200  # and the server is unharmed


def test_tls_1_2_is_taken_and_older_versions_are_refused(https: Live,
                                                         certs: Certificates) -> None:
    v12 = certs.client()
    v12.maximum_version = ssl.TLSVersion.TLSv1_2
    with v12.wrap_socket(socket.create_connection(("127.0.0.1", https.port), timeout=10),
                         server_hostname="127.0.0.1") as s:
        assert s.version() == "TLSv1.2"
    old = certs.client()
    with warnings.catch_warnings():  # Python deprecates TLS 1.1 too; this client is a relic
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that this client would speak it
    with socket.create_connection(("127.0.0.1", https.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLError) as refused:
        old.wrap_socket(raw, server_hostname="127.0.0.1")
    # The server said no (an alert, or uvloop's hang-up after its ClientHello), not this
    # client (which would have raised NO_PROTOCOLS_AVAILABLE before sending anything).
    assert refused.value.reason in ("TLSV1_ALERT_PROTOCOL_VERSION",
                                    "UNEXPECTED_EOF_WHILE_READING"), refused.value


def _get_with(live: Live, context: ssl.SSLContext) -> int:
    with context.wrap_socket(socket.create_connection(("127.0.0.1", live.port), timeout=10),
                             server_hostname="127.0.0.1") as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        return read_response(s)[0]


def test_with_a_client_ca_only_clients_with_its_certificates_get_in(
        mutual: Live, certs: Certificates) -> None:
    assert _get_with(mutual, certs.client(certs.modality)) == 200
    # TLS 1.3: the server's refusal arrives after the client's handshake, at the first read.
    for context in (certs.client(), certs.client(certs.stranger)):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _get_with(mutual, context)


def test_tritonclient_over_https_gets_the_scores_of_predict(
        https: Live, certs: Certificates) -> None:
    """The Open Inference Protocol's own client, with its TLS options."""
    data = (DATA / "dicom" / "phantom_nodule.dcm").read_bytes()
    client = triton.InferenceServerClient(url=f"127.0.0.1:{https.port}", ssl=True,
                                          ssl_context_factory=certs.client)
    try:
        assert client.is_server_ready() and client.is_model_ready("demo-cxr")
        image = triton.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([data], dtype=np.object_))
        scores = client.infer("demo-cxr", [image]).as_numpy("scores")
    finally:
        client.close()
    with httpx.Client(verify=certs.client(), timeout=60) as plain:
        r = plain.post(f"https://127.0.0.1:{https.port}/predict", content=data,
                       headers={"content-type": "application/dicom"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(scores.reshape(-1),
                               [p["score"] for p in r.json()["predictions"]], rtol=1e-5)
