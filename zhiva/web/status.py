"""
``GET /status``: is every server and model up, by its ``statusUri``.

JSON by default, a small HTML table when a browser asks for ``text/html``.
Shows URIs without query strings and never a credential.
"""
from __future__ import annotations

import html
import json
import time
from datetime import datetime, timezone

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from zhiva.errors import ProblemError
from zhiva.upstream import describe, public_uri
from zhiva.web import problem
from zhiva.web.resources import Node

CHECK_TIMEOUT = 5.0


class StatusPage(Node):
    methods = (b"GET",)

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request: Request):
        d = ensureDeferred(self._report())
        d.addCallback(self._write, request)
        d.addErrback(lambda f: problem.send(request, ProblemError(f.getErrorMessage())))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    async def _report(self) -> dict:
        config = self.app.config()
        servers = list(config.servers.values())
        models = list(config.models.values())
        checks = await gatherResults(
            [ensureDeferred(self._check(entry)) for entry in servers + models]
        )
        report: dict = {"servers": {}, "models": {}}
        for server, check in zip(servers, checks[: len(servers)]):
            report["servers"][server.key] = {
                "uri": public_uri(server.uri),
                "isDefault": server.is_default,
                "authType": server.auth_type,
                **_auth_facts(self.app.relay.auth(server)),
                **check,
            }
        for model, check in zip(models, checks[len(servers) :]):
            report["models"][model.key] = {
                "uri": public_uri(model.uri),
                "task": model.task,
                "supports": sorted(model.supports),
                "protocol": model.protocol,
                **check,
            }
        report["caches"] = self.app.relay.cache_report()
        return report

    async def _check(self, entry) -> dict:
        uri = entry.status_uri
        checked = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if uri is None:
            return {"status": "unknown", "detail": "no statusUri configured", "checkedAt": checked}
        started = time.monotonic()
        client = self.app.relay.client(entry.ca_file, entry.tls_verify)
        request = client.get(uri, allow_redirects=False, timeout=CHECK_TIMEOUT)
        try:
            response = await request
            await response.content()
        except Exception as e:
            detail = describe(e)
            if not detail or "Cancel" in detail:
                detail = f"no answer within {CHECK_TIMEOUT:g} s"
            up = False
        else:
            up = response.code == 200
            detail = f"HTTP {response.code}"
        return {
            "status": "up" if up else "down",
            "statusUri": public_uri(uri),
            "detail": detail,
            "latencyMs": round((time.monotonic() - started) * 1000, 1),
            "checkedAt": checked,
        }

    def _write(self, report: dict, request: Request) -> None:
        if request._disconnected:
            return
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        if "text/html" in accept:
            body = _html(report).encode("utf-8")
            request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        else:
            body = json.dumps(report, indent=2).encode("utf-8")
            request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        request.write(body)
        request.finish()


def _auth_facts(auth) -> dict:
    """What an auth session says of itself (signed in, token expiry); never a secret."""
    describe = getattr(auth, "describe", None)
    return dict(describe()) if describe is not None else {}


def _auth_note(entry: dict) -> str:
    """The sign-in state of a token-auth server for the HTML table."""
    if "signedIn" not in entry:
        return ""
    if entry["signedIn"]:
        note = f"; {entry['authType']}: signed in, token expires {entry.get('accessTokenExpiresAt') or 'never'}"
    else:
        note = f"; {entry['authType']}: not signed in"
    if entry.get("authProblem"):
        note += f" ({entry['authProblem']})"
    return note


def _html(report: dict) -> str:
    rows = []
    for section in ("servers", "models"):
        for key, entry in report[section].items():
            colour = {"up": "#1a7f37", "down": "#cf222e"}.get(entry["status"], "#6e7781")
            rows.append(
                "<tr>"
                f"<td>{section[:-1]}</td><td><code>{html.escape(key)}</code></td>"
                f"<td>{html.escape(entry['uri'])}</td>"
                f'<td style="color:{colour}"><b>{html.escape(entry["status"])}</b></td>'
                f"<td>{html.escape(str(entry.get('latencyMs', '')))}</td>"
                f"<td>{html.escape(entry.get('detail', '') + _auth_note(entry))}</td>"
                f"<td>{html.escape(entry['checkedAt'])}</td>"
                "</tr>"
            )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>zhiva proxy status</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 10px;text-align:left}</style>"
        "</head><body><h1>zhiva model proxy</h1><table>"
        "<tr><th>kind</th><th>key</th><th>uri</th><th>status</th><th>latency ms</th>"
        "<th>detail</th><th>checked</th></tr>" + "".join(rows) + "</table>"
        + _caches_html(report.get("caches")) + "</body></html>"
    )


def _caches_html(caches: dict | None) -> str:
    """One line per cache: enough to see it works; /metrics has the series."""
    if not caches:
        return ""
    dicom, shared, results = caches["dicom"], caches["coalescing"], caches["results"]
    lines = []
    if dicom["enabled"]:
        lines.append(
            f"DICOM cache: {dicom['hits']} hits, {dicom['misses']} misses, {dicom['entries']} entries, "
            f"{dicom['bytes']} of {dicom['maxBytes']} bytes, evictions {dicom['evictions']}"
        )
    else:
        lines.append("DICOM cache: off (--dicom-cache-dir)")
    lines.append(
        f"Coalescing: {'on' if shared['enabled'] else 'off'}, {shared['coalescedRequests']} requests "
        f"shared a run, {shared['inFlight']} runs in flight"
    )
    lines.append(
        f"Result cache: {results['hits']} hits, {results['misses']} misses, {results['entries']} results kept"
    )
    return "<h2>Caches</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"
