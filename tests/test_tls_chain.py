"""
A hospital certificate usually comes from an intermediate CA: the listener
must send the intermediate, from ``extraCertChain=`` of ``--listen`` or from
the certificate file itself, or clients that trust only the root refuse it.
"""
from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.support.proxy import free_port, make_certificate, start_proxy, write_config

SERVER = "11111111-1111-4111-8111-111111111111"


def _issue(subject: str, issuer_cert, issuer_key, *, ca: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256()), key


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """root.crt (what clients trust), leaf.crt/.key, chain.pem (the intermediate), bundle.crt (leaf + chain)."""
    d = tmp_path_factory.mktemp("pki")
    root, root_key = _issue("Hospital Root CA", None, None, ca=True)
    intermediate, intermediate_key = _issue("Hospital Issuing CA", root, root_key, ca=True)
    leaf, leaf_key = _issue("localhost", intermediate, intermediate_key, ca=False)
    (d / "root.crt").write_bytes(_pem(root))
    (d / "leaf.crt").write_bytes(_pem(leaf))
    (d / "chain.pem").write_bytes(_pem(intermediate))
    (d / "bundle.crt").write_bytes(_pem(leaf) + _pem(intermediate))
    (d / "leaf.key").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return d


def _verified_handshake(port: int, root: Path) -> str:
    context = ssl.create_default_context(cafile=str(root))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                return "verified " + tls.version()
        except ssl.SSLCertVerificationError as e:
            return f"refused: {e.verify_message}"


CASES = [
    ("leaf only", "certKey={d}/leaf.crt", "refused: unable to get local issuer certificate"),
    ("extraCertChain", "certKey={d}/leaf.crt:extraCertChain={d}/chain.pem", "verified"),
    ("chain in the certificate file", "certKey={d}/bundle.crt", "verified"),
]


@pytest.mark.parametrize("name, listen, expected", CASES, ids=[c[0] for c in CASES])
@pytest_twisted.ensureDeferred
async def test_the_listener_sends_the_intermediate(tmp_path, pki, name, listen, expected):
    config = write_config(tmp_path / "c", {SERVER: {"uri": "http://127.0.0.1:9/dicom-web", "isDefault": True}}, {})
    port = free_port()
    own = f"ssl:{port}:interface=127.0.0.1:privateKey={pki}/leaf.key:" + listen.format(d=pki)
    proxy = start_proxy(reactor, config, *make_certificate(tmp_path), "--listen", own)
    try:
        outcome = await deferToThread(_verified_handshake, port, pki / "root.crt")
    finally:
        await proxy.stop()
    assert outcome.startswith(expected), outcome
