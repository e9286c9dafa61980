"""
Outgoing HTTP shared by DICOM sources and model calls: one treq client per
upstream TLS policy with its own connection pool, a streaming body reader
with an idle timeout and a size cap, and plain-words descriptions of
connection failures for problem details.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from OpenSSL.SSL import Error as TLSError
from treq.client import HTTPClient
from twisted.internet import error as neterror
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer
from twisted.web.http import PotentialDataLoss
from twisted.web._newclient import RequestGenerationFailed, RequestTransmissionFailed

from zhiva.tls import UpstreamTLSPolicy


#: Socket read size and write-buffer high-water mark of upstream connections.
#: Twisted's 64 KiB default costs, per 64 KiB of a series, one recv() and one
#: pause/resume of the PACS socket (two epoll_ctl calls) whenever the model
#: reads a little slower; 1 MiB cuts that 16-fold and still bounds what one
#: request holds in the proxy to a few MiB.
UPSTREAM_BUFFER = 1 << 18


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Twisted's standard TCP / TLS-over-TCP endpoints, connected wide and quiet."""

    def __init__(self, reactor, policy: UpstreamTLSPolicy, connect_timeout: float) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = connect_timeout

    def endpointForURI(self, uri) -> IStreamClientEndpoint:
        endpoint = HostnameEndpoint(self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return _Wide(endpoint)


@implementer(IStreamClientEndpoint)
class _Wide:
    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory):
        factory.noisy = False  # no "Starting factory" line per pooled connection
        return self._endpoint.connect(factory).addCallback(_widen)


def _widen(protocol):
    """Give the TCP transport under ``protocol`` (and under TLS) the bigger buffer."""
    transport = protocol.transport
    while transport is not None and not isinstance(transport, FileDescriptor):
        transport = getattr(transport, "transport", None)
    if transport is not None:
        transport.bufferSize = UPSTREAM_BUFFER
        # Our writes are big or final: Nagle would only hold the last small
        # one (a part's headers, the closing chunk) for the peer's delayed ACK.
        transport.setTcpNoDelay(True)
    return protocol


class Upstream:
    """An HTTP client with its own pool; closed when its config goes away."""

    def __init__(self, reactor, ca_file: Path | None = None, verify: bool = True) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 8
        # A kept-alive connection the server closed as we reused it (Orthanc:
        # KeepAliveTimeout, 1 s) is retried once on a new one. Twisted only
        # retries bodiless idempotent requests, so a model POST never goes twice.
        self.pool.retryAutomatically = True
        endpoints = _Endpoints(reactor, UpstreamTLSPolicy(ca_file, verify), connect_timeout=30)
        self.client = HTTPClient(Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool))

    def close(self) -> Deferred:
        return self.pool.closeCachedConnections()


def public_uri(uri: str) -> str:
    """Scheme, host, port and path only: query strings may hold tokens."""
    return urlsplit(uri)._replace(query="", fragment="").geturl()


class BodyTooLarge(Exception):
    pass


class IdleTimeout(Exception):
    pass


class ConnectionClosed(Exception):
    """The upstream closed the connection before the body was complete."""


class StreamReader(Protocol):
    """
    Hands body chunks to ``on_data`` as they arrive, with backpressure
    (``pause``/``resume`` reach the socket), an idle timeout that does not
    run while we are the ones pausing, and a size cap.

    ``finished`` fires with the byte count or fails with ``IdleTimeout``,
    ``BodyTooLarge``, ``ConnectionClosed`` or whatever ``on_data`` raised.
    Cancelling ``finished`` (a viewer hanging up, a request deadline) closes
    the connection: without that, an upstream still sending would go on
    feeding a reader nobody waits for.
    """

    def __init__(
        self,
        on_data: Callable[[bytes], None],
        clock: IReactorTime,
        idle_timeout: float,
        max_bytes: int | None = None,
    ) -> None:
        self.finished: Deferred[int] = Deferred(lambda _: self._fail(CancelledError()))
        self.received = 0
        self._on_data = on_data
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._max_bytes = max_bytes
        self._timer: IDelayedCall | None = None
        self._paused = False
        self._failed = False

    def connectionMade(self) -> None:
        if self._paused:
            self.transport.pauseProducing()
        else:
            self._arm()

    def pause(self) -> None:
        self._paused = True
        self._disarm()
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume(self) -> None:
        self._paused = False
        if self.transport is not None:
            self.transport.resumeProducing()
            self._arm()

    def stop(self, reason: Exception) -> None:
        """Abandon the body: close the connection and fail ``finished``."""
        self._fail(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        self.received += len(data)
        if self._max_bytes is not None and self.received > self._max_bytes:
            self._fail(BodyTooLarge(self._max_bytes))
            return
        self._arm()
        try:
            self._on_data(data)
        except BaseException as e:  # noqa: B036 - reported through finished
            self._fail(e)

    def connectionLost(self, reason: Failure = None) -> None:
        self._disarm()
        if self._failed:
            return
        self._failed = True
        if reason is None or reason.check(ResponseDone):
            self.finished.callback(self.received)
        elif reason.check(PotentialDataLoss):
            # No Content-Length and no chunking: the close ends the body.
            self.finished.callback(self.received)
        else:
            self.finished.errback(ConnectionClosed(describe(reason)))

    def _fail(self, reason: BaseException) -> None:
        if self._failed:
            return
        self._failed = True
        self._disarm()
        if self.transport is not None:
            self.transport.stopProducing()
        self.finished.errback(Failure(reason))

    def _arm(self) -> None:
        if self._paused or self._failed:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)
        else:
            self._timer = self._clock.callLater(self._idle_timeout, self._idle)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _idle(self) -> None:
        self._timer = None
        self._fail(IdleTimeout(self._idle_timeout))


def read_body(response, clock, idle_timeout: float, max_bytes: int) -> Deferred[bytes]:
    """The whole body of a (small-ish) response, capped and with an idle timeout."""
    chunks: list[bytes] = []
    reader = StreamReader(chunks.append, clock, idle_timeout, max_bytes)
    response.deliverBody(reader)
    return reader.finished.addCallback(lambda _: b"".join(chunks))


class NoAnswer(Exception):
    """The upstream sent no response within its time (``answer_within``)."""


async def answer_within(request: Deferred, clock: IReactorTime, seconds: float):
    """
    ``await request``, cancelling it after ``seconds``. Raises ``NoAnswer``
    then, whatever the cancel surfaced as (treq wraps it differently at each
    stage: ``Deferred.addTimeout`` only converts a bare ``CancelledError``),
    and a plain ``CancelledError`` for a cancel from outside (the viewer hung
    up); any other failure as it came.
    """
    timed_out = []

    def on_timeout() -> None:
        timed_out.append(True)
        request.cancel()

    timer = clock.callLater(seconds, on_timeout)
    try:
        return await request
    except Exception as e:
        if timed_out:
            raise NoAnswer() from None
        if is_cancellation(e):
            raise CancelledError() from None
        raise
    finally:
        if timer.active():
            timer.cancel()


def is_cancellation(exc: BaseException) -> bool:
    """True when ``exc`` is, or wraps, our own cancel of the request."""
    if isinstance(exc, CancelledError):
        return True
    reasons = getattr(exc, "reasons", None) or []
    return any(reason.check(CancelledError) for reason in reasons)


def describe(failure: Failure | BaseException) -> str:
    """A failure in words fit for a problem detail (no secrets: none are in it)."""
    exc = failure.value if isinstance(failure, Failure) else failure
    if isinstance(exc, (ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed,
                        RequestGenerationFailed)):
        reasons = getattr(exc, "reasons", None) or []
        for reason in reasons:
            if not reason.check(CancelledError):
                return describe(reason)
        if reasons:
            return describe(reasons[0])
    if isinstance(exc, TLSError):
        return f"TLS handshake failed ({_tls_reason(exc)})"
    if isinstance(exc, neterror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, neterror.DNSLookupError):
        return "host name not found"
    if isinstance(exc, (neterror.TimeoutError, neterror.TCPTimedOutError)):
        return "connection timed out"
    if isinstance(exc, neterror.ConnectionLost):
        return "connection lost"
    if isinstance(exc, neterror.ConnectionDone):
        return "connection closed"
    if isinstance(exc, ConnectionClosed):
        return str(exc)
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _tls_reason(exc: TLSError) -> str:
    try:
        return "; ".join(str(part[2]) for part in exc.args[0]) or "TLS error"
    except (IndexError, TypeError):
        return str(exc)[:200]
