"""
``twistd zhiva``: options, start-up checks and the service tree.

A problem that stops start-up (unreadable config, missing certificate) is
printed as one line per problem saying which file and what to do, and twistd
exits 1.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.python import usage

from zhiva import config as configuration
from zhiva.dicom_cache import DEFAULT_TTL, DicomCache, parse_size
from zhiva.limits import Limits
from zhiva.logs import LOG_FORMATS, observer_for
from zhiva.service import DEFAULT_GRACE, ZhivaService
from zhiva.state import StateDir
from zhiva.tls import ServerTLS
from zhiva.viewer_auth import KeyFileError, ViewerAuth, load_keys
from zhiva.web.app import WebApp, ZhivaSite
from zhiva.web.cors import CORSPolicy

DEFAULT_LISTEN = "ssl:8002:privateKey=zhiva.key:certKey=zhiva.crt"
_SSL_KEYS = {"interface", "backlog", "privateKey", "certKey", "extraCertChain"}


class StartupError(Exception):
    pass


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve the zhiva inference routes over HTTPS: fetch DICOM from the PACS servers "
        "of servers.json and relay it to the model APIs of models.json. SIGHUP reloads "
        "both files and the TLS certificate; SIGTERM stops gracefully."
    )
    optParameters = [
        ["config-dir", "d", ".", "Directory holding servers.json and models.json."],
        ["grace", None, DEFAULT_GRACE, "Seconds requests in flight may take to finish on stop.", float],
        ["log-format", None, "text", f"Log format: {' or '.join(LOG_FORMATS)}."],
        ["log-dir", None, None, "Write rotated log files zhiva.log* here instead of twistd's log."],
        ["state-dir", None, None, "Keep PACS tokens here across restarts (default: none, nothing kept)."],
        ["viewer-auth-keys", None, None,
         "Require viewer JWTs (Authorization: Bearer) signed by the public key(s) of this PEM or JWKS file."],
        ["viewer-auth-issuer", None, None, "The iss viewer tokens must carry (needed with --viewer-auth-keys)."],
        ["viewer-auth-audience", None, None, "The aud viewer tokens must carry (needed with --viewer-auth-keys)."],
        ["max-url-length", None, Limits.max_url_length, "Longest request path and query, bytes (longer: 414).", int],
        ["max-header-bytes", None, Limits.max_header_bytes, "Request line and headers, bytes (more: 400).", int],
        ["max-instances", None, Limits.max_instances, "Instances one request may send to a model (more: 413).", int],
        ["max-fetch-bytes", None, Limits.max_fetch_bytes, "DICOM bytes one request may fetch (more: 413).", int],
        ["max-result-bytes", None, Limits.max_result_bytes, "Bytes of a model's answer (more: 502).", int],
        ["model-concurrency", None, Limits.model_concurrency, "Requests one model gets at once.", int],
        ["model-queue", None, Limits.model_queue, "Requests that may wait for a busy model (more: 503).", int],
        ["queue-timeout", None, Limits.queue_timeout, "Seconds a request may wait for a busy model (then 503).", float],
        ["max-request-seconds", None, Limits.max_request_seconds,
         "Seconds one request may take once it has its model slot: PACS, model and answer (more: 504).", float],
        ["dicom-cache-dir", None, None,
         "Cache DICOM fetched from PACS servers in this directory (created 0700); default: no cache."],
        ["dicom-cache-size", None, "10G", "Most the DICOM cache may hold: bytes, or with K, M, G, T (LRU beyond)."],
        ["dicom-cache-ttl", None, DEFAULT_TTL, "Seconds a cached retrieve is used before it is fetched again.", float],
    ]
    optFlags = [
        ["status-page", None, "Serve GET /status (also: ZHIVA_SHOW_STATUS_PAGE=true)."],
        ["no-coalescing", None, "Run identical concurrent requests separately (default: they share one run)."],
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
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        for name in ("max-url-length", "max-header-bytes", "max-instances", "max-fetch-bytes",
                     "max-result-bytes", "model-concurrency", "queue-timeout", "max-request-seconds"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be more than 0")
        try:
            self["dicom-cache-size"] = parse_size(str(self["dicom-cache-size"]))
        except ValueError as e:
            raise usage.UsageError(f"--dicom-cache-size: {e}") from None
        if self["dicom-cache-ttl"] <= 0:
            raise usage.UsageError("--dicom-cache-ttl must be more than 0")
        if self["model-queue"] < 0:
            raise usage.UsageError("--model-queue must be 0 or more")
        if self["viewer-auth-keys"] and not (self["viewer-auth-issuer"] and self["viewer-auth-audience"]):
            raise usage.UsageError("--viewer-auth-keys needs --viewer-auth-issuer and --viewer-auth-audience")
        if not self["viewer-auth-keys"] and (self["viewer-auth-issuer"] or self["viewer-auth-audience"]):
            raise usage.UsageError("--viewer-auth-issuer/--viewer-auth-audience need --viewer-auth-keys")
        env = os.environ.get("ZHIVA_SHOW_STATUS_PAGE", "").strip().lower()
        if env in ("true", "1", "yes"):
            self["status-page"] = True


def server_tls(description: str) -> ServerTLS | None:
    """The reloadable certificate of an ``ssl:`` endpoint; None for others."""
    if not description.startswith("ssl:"):
        return None
    args = _endpoint_args(description)
    unknown = set(args) - _SSL_KEYS
    if unknown:
        raise StartupError(f"--listen {description}: unsupported ssl option(s) {', '.join(sorted(unknown))}")
    key = Path(args.get("privateKey", "server.pem"))
    cert = Path(args.get("certKey", str(key)))
    chain = Path(args["extraCertChain"]) if "extraCertChain" in args else None
    try:
        return ServerTLS(cert, key, chain)
    except ValueError as e:
        raise StartupError(f"{e} (--listen {description})") from None


def _endpoint_args(description: str) -> dict[str, str]:
    parts = re.split(r"(?<!\\):", description)
    return dict(p.split("=", 1) for p in parts[2:] if "=" in p)


def _listener(description: str, site, reactor, tls: ServerTLS | None):
    if tls is None:
        return strports.service(description, site)
    parts = re.split(r"(?<!\\):", description)
    args = _endpoint_args(description)
    try:
        port = int(parts[1])
    except (IndexError, ValueError):
        raise StartupError(f"--listen {description}: the port must be a number") from None
    endpoint = SSL4ServerEndpoint(
        reactor,
        port,
        tls,
        backlog=int(args.get("backlog", 50)),
        interface=args.get("interface", "").replace("\\:", ":"),
    )
    service = StreamServerEndpointService(endpoint, site)
    # As strports.service does for plain endpoints: a port already taken stops
    # start-up (twistd exits 1) instead of leaving a daemon that serves nothing.
    service._raiseSynchronously = True
    return service


def state_directory(value: str | None) -> Path | None:
    """The ``--state-dir``, created owner-only if missing; None without the option."""
    if not value:
        return None
    path = Path(value)
    try:
        StateDir(path).prepare()
    except OSError as e:
        raise StartupError(
            f"state directory {path.resolve()} cannot be used ({e.strerror or e}) (--state-dir); "
            "create it writable by the service user"
        ) from None
    return path


def build(options: Options, reactor) -> ZhivaService:
    try:
        config = configuration.load(options["config-dir"])
    except configuration.ConfigError as e:
        raise StartupError("\n".join(f"config error: {p}" for p in e.problems)) from None
    listening = [(d, server_tls(d)) for d in options["listen"]]
    service = ZhivaService(config, reactor, grace=options["grace"])
    service.relay.state_dir = state_directory(options["state-dir"])
    service.log_observer = observer_for(options["log-format"], options["log-dir"])
    limits = limits_of(options)
    service.relay.set_limits(limits)
    service.relay.coalescing = not options["no-coalescing"]
    cache = dicom_cache(options, reactor)
    if cache is not None:
        cache.setServiceParent(service)
        service.relay.dicom_cache = cache
    web = WebApp(
        service,
        cors=CORSPolicy(tuple(options["cors-origin"])),
        status_page=options["status-page"],
    )
    web.viewer_auth = viewer_auth(options)
    web.limits = limits
    if web.viewer_auth is None:
        for model in config.models.values():
            if model.access is not None:
                service.log.warn(
                    "models.json: entry {key} has access rules but viewer auth is off "
                    "(--viewer-auth-keys): every request to it gets 403",
                    key=model.key,
                )
    site = ZhivaSite(web)
    for description, tls in listening:
        service.listen(_listener(description, site, reactor, tls), tls)
    return service


def dicom_cache(options: Options, reactor) -> DicomCache | None:
    """The ``--dicom-cache-dir`` cache, its directory made owner-only; None without the option."""
    if not options["dicom-cache-dir"]:
        return None
    cache = DicomCache(
        Path(options["dicom-cache-dir"]), options["dicom-cache-size"], options["dicom-cache-ttl"], reactor
    )
    try:
        cache.prepare()
    except OSError as e:
        raise StartupError(
            f"DICOM cache directory {cache.directory.resolve()} cannot be used ({e.strerror or e}) "
            "(--dicom-cache-dir); create it writable by the service user"
        ) from None
    return cache


def limits_of(options: Options) -> Limits:
    return Limits(
        max_url_length=options["max-url-length"],
        max_header_bytes=options["max-header-bytes"],
        max_instances=options["max-instances"],
        max_fetch_bytes=options["max-fetch-bytes"],
        max_result_bytes=options["max-result-bytes"],
        model_concurrency=options["model-concurrency"],
        model_queue=options["model-queue"],
        queue_timeout=options["queue-timeout"],
        max_request_seconds=options["max-request-seconds"],
    )


def viewer_auth(options: Options) -> ViewerAuth | None:
    if not options["viewer-auth-keys"]:
        return None
    try:
        keys = load_keys(options["viewer-auth-keys"])
    except KeyFileError as e:
        raise StartupError(f"{e} (--viewer-auth-keys)") from None
    return ViewerAuth(keys, options["viewer-auth-issuer"], options["viewer-auth-audience"])


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    try:
        return build(options, reactor)
    except StartupError as e:
        sys.stderr.write("".join(f"zhiva: {line}\n" for line in str(e).splitlines()))
        raise SystemExit(1) from None
