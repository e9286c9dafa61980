"""
``twistd zhiva``: options, start-up checks and the service tree.

A problem that stops start-up (unreadable config, missing certificate) is
printed as one line saying which file and what to do, and twistd exits 1.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from OpenSSL import crypto
from twisted.application import strports
from twisted.application.service import IService
from twisted.python import usage

from zhiva import config as configuration
from zhiva.service import ZhivaService
from zhiva.web.app import WebApp, ZhivaSite
from zhiva.web.cors import CORSPolicy

DEFAULT_LISTEN = "ssl:8002:privateKey=zhiva.key:certKey=zhiva.crt"
OPENSSL_HINT = (
    "for a local self-signed certificate run: openssl req -x509 -newkey rsa:4096 -sha256 "
    "-days 365 -nodes -keyout zhiva.key -out zhiva.crt -subj '/CN=localhost'"
)


class StartupError(Exception):
    pass


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve the zhiva inference routes over HTTPS: fetch DICOM from the PACS servers "
        "of servers.json and relay it to the model APIs of models.json."
    )
    optParameters = [
        ["config-dir", "d", ".", "Directory holding servers.json and models.json."],
    ]
    optFlags = [
        ["status-page", None, "Serve GET /status (also: ZHIVA_SHOW_STATUS_PAGE=true)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["cors-origin"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to serve on, repeatable (default: ssl:8002:privateKey=zhiva.key:certKey=zhiva.crt)."""
        self["listen"].append(description)

    def opt_cors_origin(self, origin: str) -> None:
        """Origin allowed to call the proxy from a browser, repeatable (default: any, '*')."""
        self["cors-origin"].append(origin)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if not self["cors-origin"]:
            self["cors-origin"] = ["*"]
        env = os.environ.get("ZHIVA_SHOW_STATUS_PAGE", "").strip().lower()
        if env in ("true", "1", "yes"):
            self["status-page"] = True


def _endpoint_args(description: str) -> dict[str, str]:
    parts = re.split(r"(?<!\\):", description)
    return dict(p.split("=", 1) for p in parts[1:] if "=" in p)


def check_tls_files(description: str) -> None:
    """Fail with a one-line fix when an ``ssl:`` endpoint's files are missing or bad."""
    if not description.startswith("ssl:"):
        return
    args = _endpoint_args(description)
    key = Path(args.get("privateKey", "server.pem"))
    cert = Path(args.get("certKey", str(key)))
    for path, what in ((cert, "certificate"), (key, "private key")):
        if not path.is_file():
            raise StartupError(f"TLS {what} {path.resolve()} not found (--listen {description}); {OPENSSL_HINT}")
    try:
        crypto.load_certificate(crypto.FILETYPE_PEM, cert.read_bytes())
    except (crypto.Error, OSError) as e:
        raise StartupError(f"TLS certificate {cert.resolve()} is not a readable PEM certificate ({e}); {OPENSSL_HINT}")
    try:
        crypto.load_privatekey(crypto.FILETYPE_PEM, key.read_bytes())
    except (crypto.Error, OSError) as e:
        raise StartupError(f"TLS private key {key.resolve()} is not a readable PEM key ({e}); {OPENSSL_HINT}")


def build(options: Options, reactor) -> ZhivaService:
    try:
        config = configuration.load(options["config-dir"])
    except configuration.ConfigError as e:
        raise StartupError("\n".join(f"config error: {p}" for p in e.problems)) from None
    for description in options["listen"]:
        check_tls_files(description)
    service = ZhivaService(config, reactor)
    web = WebApp(
        config=service.current_config,
        relay=service.relay,
        cors=CORSPolicy(tuple(options["cors-origin"])),
        status_page=options["status-page"],
        clock=reactor,
    )
    site = ZhivaSite(web)
    for description in options["listen"]:
        strports.service(description, site).setServiceParent(service)
    return service


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    try:
        return build(options, reactor)
    except StartupError as e:
        sys.stderr.write(f"zhiva: {e}\n")
        raise SystemExit(1)
