"""Certificates for the TLS tests: a hospital CA (trustme) that signs the service's, a
PACS's and a modality's certificates, and a second CA that nobody trusts. RSA keys, the
kind DICOM's TLS profiles expect."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Pair:
    """A certificate (with its chain) and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the hospital CA's certificate
    service: Pair  # 127.0.0.1 / localhost
    pacs: Pair  # 127.0.0.1 / localhost
    modality: Pair  # a client certificate
    stranger_ca: Path  # a CA nobody here trusts
    stranger: Pair  # 127.0.0.1 / localhost, signed by stranger_ca

    def client(self, own: Pair | None = None, ca: Path | None = None) -> ssl.SSLContext:
        """A client context trusting ``ca`` (the hospital's by default), showing ``own``."""
        context = ssl.create_default_context(cafile=str(ca or self.ca))
        if own is not None:
            context.load_cert_chain(own.cert, own.key)
        return context


def _pair(ca: trustme.CA, folder: Path, name: str, *identities: str) -> Pair:
    issued = ca.issue_cert(*identities, key_type=trustme.KeyType.RSA)
    pair = Pair(folder / f"{name}.crt", folder / f"{name}.key")
    pair.cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(pair.key)
    return pair


def make_certificates(folder: Path) -> Certificates:
    hospital = trustme.CA(organization_name="medexplain test hospital",
                          key_type=trustme.KeyType.RSA)
    stranger = trustme.CA(organization_name="someone else", key_type=trustme.KeyType.RSA)
    hospital.cert_pem.write_to_path(folder / "ca.crt")
    stranger.cert_pem.write_to_path(folder / "stranger-ca.crt")
    return Certificates(
        ca=folder / "ca.crt",
        service=_pair(hospital, folder, "service", "127.0.0.1", "localhost"),
        pacs=_pair(hospital, folder, "pacs", "127.0.0.1", "localhost"),
        modality=_pair(hospital, folder, "modality", "modality1.example.org"),
        stranger_ca=folder / "stranger-ca.crt",
        stranger=_pair(stranger, folder, "stranger", "127.0.0.1", "localhost"),
    )
