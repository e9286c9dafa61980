"""
``python -m zhiva.demo DIR``: everything the one-command demo needs before
``twistd zhiva`` starts: a self-signed certificate (if missing), a chest CT
phantom in DIR/dicom, a config using the folder source and the in-process
lung models, and the curl commands to paste.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from zhiva.demo.phantom import Phantom, write_phantom

SERVER = "0d1f5a3e-5b7c-4e2a-9f6b-1c2d3e4f5a6b"
SEGMENTATION = "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b"
PREDICTION = "8a9b0c1d-2e3f-4a5b-9c6d-7e8f9a0b1c2d"
LEVELS = ["/studies", "/studies/series", "/studies/series/instances"]


def ensure_certificate(cert: Path, key: Path) -> bool:
    """A self-signed certificate for localhost, like the setup guide's openssl command."""
    if cert.exists() and key.exists():
        return False
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return True


def write_config(directory: Path, dicom: Path) -> None:
    servers = {SERVER: {"uri": dicom.resolve().as_uri(), "isDefault": True}}
    models = {
        SEGMENTATION: {"uri": "plugin:lung-threshold", "task": "segmentation", "supports": LEVELS},
        PREDICTION: {"uri": "plugin:lung-volume", "task": "prediction", "supports": LEVELS},
    }
    (directory / "servers.json").write_text(json.dumps(servers, indent=2) + "\n")
    (directory / "models.json").write_text(json.dumps(models, indent=2) + "\n")


def write_real_examples(directory: Path) -> None:
    """The same config shape for a real Orthanc and a real model API, to copy over."""
    servers = {
        SERVER: {
            "uri": "http://localhost:8042/dicom-web",
            "isDefault": True,
            "statusUri": "http://localhost:8042/system",
            "authType": "basicAuth",
            "login": "orthanc",
            "password": {"env": "ORTHANC_PASSWORD"},
        }
    }
    models = {
        SEGMENTATION: {
            "uri": "http://localhost:8011/segmentation",
            "task": "segmentation",
            "supports": ["/studies/series", "/studies/series/instances"],
            "statusUri": "http://localhost:8011/docs",
        },
        PREDICTION: {"uri": "http://localhost:8011/prediction", "task": "prediction", "supports": LEVELS},
    }
    (directory / "servers.orthanc-example.json").write_text(json.dumps(servers, indent=2) + "\n")
    (directory / "models.model-api-example.json").write_text(json.dumps(models, indent=2) + "\n")


def curl_commands(phantom: Phantom, port: int) -> list[str]:
    base = f"https://localhost:{port}"
    series = f"studies/{phantom.study_uid}/series/{phantom.series_uid}"
    middle = phantom.sop_uids[len(phantom.sop_uids) // 2]
    return [
        f"curl -k {base}/predictions/{PREDICTION}/{series}",
        f"curl -k {base}/segmentations/{SEGMENTATION}/{series}/instances/{middle}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zhiva.demo", description=__doc__)
    parser.add_argument("directory", type=Path, help="where the demo's DICOM and config go")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--certs", type=Path, default=Path("."), help="where zhiva.crt/zhiva.key are")
    parser.add_argument("--slices", type=int, default=120)
    args = parser.parse_args(argv)
    args.directory.mkdir(parents=True, exist_ok=True)
    if ensure_certificate(args.certs / "zhiva.crt", args.certs / "zhiva.key"):
        print(f"wrote a self-signed zhiva.crt and zhiva.key for localhost to {args.certs}")
    dicom = args.directory / "dicom"
    phantom = write_phantom(dicom, slices=args.slices)
    write_config(args.directory, dicom)
    write_real_examples(args.directory)
    print(
        f"wrote a {len(phantom.files)}-slice chest CT phantom (lungs {phantom.lung_volume_ml:.0f} ml) "
        f"to {dicom} and a config to {args.directory}/servers.json, models.json\n"
        f"(for a real Orthanc and model API, see servers.orthanc-example.json and\n"
        f" models.model-api-example.json beside them)\n"
        "When the proxy says it is listening, paste into another terminal:\n"
    )
    for command in curl_commands(phantom, args.port):
        print("  " + command)
    print()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
