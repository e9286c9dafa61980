"""
TLS both ways: outgoing connections verified by default (a per-upstream CA
file for self-signed PACS certificates, an explicit opt-out), and the
listening certificate, reloadable.
"""
from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLContextFactory
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
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


OPENSSL_HINT = (
    "for a local self-signed certificate run: openssl req -x509 -newkey rsa:4096 -sha256 "
    "-days 365 -nodes -keyout zhiva.key -out zhiva.crt -subj '/CN=localhost'"
)


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """
    The listening side's certificate, re-read on reload: Twisted asks
    ``getContext()`` for every new connection, so a swap here reaches the
    next TLS connection while open ones keep theirs.
    """

    def __init__(self, cert: Path, key: Path, chain: Path | None = None) -> None:
        self.cert, self.key, self.chain = cert, key, chain
        self._options = self.load()

    def load(self) -> CertificateOptions:
        """Read and check the files; raise ``ValueError`` saying which file and what to do."""
        for path, what in ((self.cert, "certificate"), (self.key, "private key")):
            if not path.is_file():
                raise ValueError(f"TLS {what} {path.resolve()} not found; {OPENSSL_HINT}")
        try:
            certificates = x509.load_pem_x509_certificates(self.cert.read_bytes())
        except (ValueError, OSError) as e:
            raise ValueError(f"TLS certificate {self.cert.resolve()} is not a readable PEM certificate ({e}); {OPENSSL_HINT}") from None
        try:
            private = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as e:
            raise ValueError(f"TLS private key {self.key.resolve()} is not a readable unencrypted PEM key ({e}); {OPENSSL_HINT}") from None
        if private.public_key().public_numbers() != certificates[0].public_key().public_numbers():
            raise ValueError(f"TLS private key {self.key.resolve()} does not belong to certificate {self.cert.resolve()}")
        chain = certificates[1:]
        if self.chain is not None:
            try:
                chain += x509.load_pem_x509_certificates(self.chain.read_bytes())
            except (ValueError, OSError) as e:
                raise ValueError(f"TLS certificate chain {self.chain.resolve()} is not readable PEM ({e})") from None
        return CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(private),
            certificate=crypto.X509.from_cryptography(certificates[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain],
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )

    def swap(self, options: CertificateOptions) -> None:
        self._options = options

    def getContext(self):
        return self._options.getContext()
