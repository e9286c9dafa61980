"""
TLS for outgoing connections: verified by default, a per-upstream CA file
for self-signed PACS certificates, and an explicit opt-out.
"""
from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


def load_trust_root(ca_file: Path):
    """All certificates of a PEM bundle as one trust root."""
    certificates = x509.load_pem_x509_certificates(ca_file.read_bytes())
    return trustRootFromCertificates(
        [Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates]
    )


@implementer(IPolicyForHTTPS)
class UpstreamTLSPolicy:
    def __init__(self, ca_file: Path | None = None, verify: bool = True) -> None:
        self._verify = verify
        self._trust = load_trust_root(ca_file) if ca_file is not None else platformTrust()

    def creatorForNetloc(self, hostname: bytes, port: int):
        host = hostname.decode("ascii")
        if not self._verify:
            return _Unverified(host)
        return optionsForClientTLS(host, trustRoot=self._trust)


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS without certificate checks: only when a config says tlsVerify: false."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname.encode("idna")
        self._context = CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._hostname)
        return connection
