"""
The proxy under test, in-process on the test reactor over real HTTPS, and a
client that trusts its self-signed certificate.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from zhiva.tap import Options, build
from zhiva.tls import UpstreamTLSPolicy


def make_certificate(directory: Path, name: str = "zhiva") -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory: Path, servers: dict[str, Any], models: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "servers.json").write_text(json.dumps(servers, indent=2))
    (directory / "models.json").write_text(json.dumps(models, indent=2))
    return directory


@dataclass
class RunningProxy:
    service: Any
    url: str
    client: HTTPClient
    pool: HTTPConnectionPool

    async def get(self, path: str, **kwargs):
        """GET ``path``; returns (response, body bytes)."""
        response = await self.client.get(self.url + path, **kwargs)
        return response, await response.content()

    async def get_json(self, path: str, **kwargs):
        response, body = await self.get(path, **kwargs)
        return response, json.loads(body)

    async def stop(self) -> None:
        await self.pool.closeCachedConnections()
        await self.service.stopService()


def start_proxy(reactor, config_dir: Path, cert: Path, key: Path, *extra: str) -> RunningProxy:
    port = free_port()
    options = Options()
    options.parseOptions(
        [
            "--config-dir",
            str(config_dir),
            "--listen",
            f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            *extra,
        ]
    )
    service = build(options, reactor)
    service.startService()
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, contextFactory=UpstreamTLSPolicy(cert), pool=pool))
    return RunningProxy(service, f"https://127.0.0.1:{port}", client, pool)

