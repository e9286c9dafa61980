"""
Misbehaving upstreams on the test reactor: a raw-socket HTTP server whose
first path segment picks a scripted answer (``/reset/...``, ``/slow/...``).
It reads the request (and a chunked request body to its end) before it
misbehaves, so the proxy sees exactly the fault under test.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall


class Scripted(Protocol):
    def __init__(self, scripts: dict[str, Callable]) -> None:
        self.scripts = scripts
        self.buffer = b""
        self.head: bytes | None = None
        self.answered = False
        self.loops: list[LoopingCall] = []

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.answered:
            return
        if self.head is None:
            if b"\r\n\r\n" not in self.buffer:
                return
            self.head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b"transfer-encoding: chunked" in self.head.lower() and not self.buffer.endswith(b"0\r\n\r\n"):
            return  # keep reading the request body
        self.answered = True
        path = self.head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
        self.factory.requests.append(path)
        name = path.split("/")[1]
        self.scripts[name](self)

    def every(self, seconds: float, step: Callable[[], bool]) -> None:
        """Call ``step`` every ``seconds`` until it returns False or the connection ends."""
        loop = LoopingCall(lambda: step() or loop.stop())
        loop.clock = self.factory.reactor
        self.loops.append(loop)
        loop.start(seconds, now=False)

    def connectionLost(self, reason=None) -> None:
        self.factory.open -= 1
        for loop in self.loops:
            if loop.running:
                loop.stop()


class ScriptedFactory(Factory):
    def __init__(self, reactor, scripts: dict[str, Callable]) -> None:
        self.reactor = reactor
        self.scripts = scripts
        self.requests: list[str] = []
        self.open = 0

    def buildProtocol(self, addr):
        protocol = Scripted(self.scripts)
        protocol.factory = self
        self.open += 1
        return protocol


def listen(reactor, scripts: dict[str, Callable]):
    """(port object, factory); the URL is http://127.0.0.1:{port.getHost().port}."""
    factory = ScriptedFactory(reactor, scripts)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, factory


# PACS scripts

BOUNDARY = b"zhiva-fake-boundary"
DICOM = b"\0" * 128 + b"DICM" + os.urandom(4000)


def _head(status: bytes, headers: dict[bytes, bytes]) -> bytes:
    lines = [b"HTTP/1.1 " + status] + [k + b": " + v for k, v in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _multipart(headers: dict[bytes, bytes], length: int | None = None, boundary: bytes | None = BOUNDARY):
    content_type = b'multipart/related; type="application/dicom"'
    if boundary is not None:
        content_type += b"; boundary=" + boundary
    all_headers = {b"Content-Type": content_type, b"Connection": b"close"}
    if length is not None:
        all_headers[b"Content-Length"] = b"%d" % length
    all_headers.update(headers)
    return _head(b"200 OK", all_headers)


def part(data: bytes = DICOM, headers: bytes = b"Content-Type: application/dicom\r\n") -> bytes:
    return b"--" + BOUNDARY + b"\r\n" + headers + b"\r\n" + data + b"\r\n"


CLOSE = b"--" + BOUNDARY + b"--\r\n"


def pacs_reset(p: Scripted) -> None:
    """Promises two instances, sends one and a half, then resets the connection."""
    body = part() + part()[:2000]
    p.transport.write(_multipart({}, length=len(part()) * 2 + len(CLOSE)) + body)
    p.factory.reactor.callLater(0.05, p.transport.abortConnection)


def pacs_no_boundary(p: Scripted) -> None:
    body = part() + CLOSE
    p.transport.write(_multipart({}, len(body), boundary=None) + body)
    p.transport.loseConnection()


def pacs_unclosed(p: Scripted) -> None:
    """A whole part, then the body ends without the closing delimiter."""
    body = part()
    p.transport.write(_multipart({}, len(body)) + body)
    p.transport.loseConnection()


def pacs_huge_part_headers(p: Scripted) -> None:
    body = part(headers=b"X-Padding: " + b"a" * 200_000 + b"\r\n") + CLOSE
    p.transport.write(_multipart({}, len(body)) + body)
    p.transport.loseConnection()


def pacs_part_without_headers(p: Scripted) -> None:
    body = part(data=b"this is not DICOM" * 20, headers=b"") + CLOSE
    p.transport.write(_multipart({}, len(body)) + body)
    p.transport.loseConnection()


def pacs_5xx(p: Scripted) -> None:
    body = b"Orthanc is having a bad day"
    p.transport.write(_head(b"503 Service Unavailable", {b"Content-Length": b"%d" % len(body)}) + body)


def pacs_slow(p: Scripted) -> None:
    """One byte at a time, slower than the server's idle timeout allows."""
    body = part() + CLOSE
    p.transport.write(_multipart({}, len(body)))
    left = [body]

    def step() -> bool:
        p.transport.write(left[0][:1])
        left[0] = left[0][1:]
        return bool(left[0])

    p.every(1.0, step)


def pacs_drip(p: Scripted) -> None:
    """
    A preamble without end, a byte every 0.2 s: each byte comes well within
    the idle timeout, so only a deadline on the whole request ends it.
    """
    p.transport.write(_multipart({}))
    p.every(0.2, lambda: p.transport.write(b"x") or True)


def pacs_stale_keepalive(p: Scripted) -> None:
    """
    Serves one instance and keeps the connection open; the next request on
    that connection finds it closed, unanswered: Orthanc closing a kept-alive
    connection (KeepAliveTimeout, 1 s by default) just as the proxy reuses it.
    """
    if getattr(p, "served", False):
        p.transport.loseConnection()
        return
    p.served = True
    body = part() + CLOSE
    p.transport.write(_multipart({b"Connection": b"keep-alive"}, len(body)) + body)
    p.answered, p.head, p.buffer = False, None, b""  # read the next request


PACS_SCRIPTS = {
    "reset": pacs_reset,
    "noboundary": pacs_no_boundary,
    "unclosed": pacs_unclosed,
    "hugeheaders": pacs_huge_part_headers,
    "noheaders": pacs_part_without_headers,
    "fail": pacs_5xx,
    "slow": pacs_slow,
    "drip": pacs_drip,
    "stalekeepalive": pacs_stale_keepalive,
}


# Model scripts


def model_close_mid_answer(p: Scripted) -> None:
    p.transport.write(_head(b"200 OK", {b"Content-Type": b"application/json", b"Content-Length": b"100000"}))
    p.transport.write(b'{"1.2.3": {"metadata": [')
    p.factory.reactor.callLater(0.05, p.transport.loseConnection)


def model_silent(p: Scripted) -> None:
    """Reads the request and never answers."""


def model_garbage(p: Scripted) -> None:
    size = 4 << 20
    p.transport.write(_head(b"200 OK", {b"Content-Type": b"application/json", b"Content-Length": b"%d" % size}))
    p.transport.write(os.urandom(size))


def model_redirect(p: Scripted) -> None:
    p.transport.write(
        _head(b"302 Found", {b"Location": b"http://elsewhere.invalid/steal", b"Content-Length": b"0"})
    )


def model_drip(p: Scripted) -> None:
    """Promises a big answer and sends it a byte every 0.2 s, within any idle timeout."""
    p.transport.write(_head(b"200 OK", {b"Content-Type": b"application/json", b"Content-Length": b"100000"}))
    p.every(0.2, lambda: p.transport.write(b" ") or True)


def model_ok(p: Scripted) -> None:
    """A valid prediction for the ``study`` and ``series`` of the model URL's query."""
    query = dict(kv.split("=") for kv in p.head.split(b"\r\n", 1)[0].split(b" ")[1].decode().split("?")[1].split("&"))
    metadata = [{"dataType": "number", "value": 1, "title": "ok"}]
    body = json.dumps({query["study"]: {"metadata": metadata, query["series"]: {"metadata": metadata}}}).encode()
    p.transport.write(
        _head(b"200 OK", {b"Content-Type": b"application/json", b"Content-Length": b"%d" % len(body),
                          b"Connection": b"close"}) + body
    )
    p.transport.loseConnection()


MODEL_SCRIPTS = {
    "close": model_close_mid_answer,
    "silent": model_silent,
    "garbage": model_garbage,
    "redirect": model_redirect,
    "drip": model_drip,
    "ok": model_ok,
}
