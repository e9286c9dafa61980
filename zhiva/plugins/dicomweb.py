"""
The DICOMweb source: WADO-RS retrieve from ``http(s)`` servers of
servers.json, streamed part by part into the model request.
"""
from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from zhiva.errors import NotFound, ProblemError, UpstreamError, UpstreamTimeout
from zhiva.interfaces import IDicomSource, IDicomSourceFactory, IInstanceConsumer, IRetrieval
from zhiva.multipart import MultipartError, MultipartParser, parse_content_type
from zhiva.retrieval import settle
from zhiva.selection import Target
from zhiva.upstream import (
    BodyTooLarge,
    ConnectionClosed,
    IdleTimeout,
    NoAnswer,
    StreamReader,
    Upstream,
    answer_within,
    describe,
)

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# Part 10: a 128-byte preamble, then the magic. Checked so that a model
# never receives something that is not a DICOM file.
_MAGIC_END = 132


class PartChecker:
    """Checks each part is a DICOM Part 10 file before passing it on."""

    def __init__(self, consumer: IInstanceConsumer, what: str) -> None:
        self._consumer = consumer
        self._what = what
        self._head = b""
        self.count = 0

    def begin(self, headers: dict[str, str]) -> None:
        content_type = headers.get("content-type")
        if content_type is not None:
            media, _ = parse_content_type(content_type)
            if media != "application/dicom":
                raise MultipartError(f"part {self.count + 1} is {media}, not application/dicom")
        self._head = b""
        self.count += 1
        self._consumer.instanceStarted()

    def data(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            if len(self._head) < _MAGIC_END:
                return
            data, self._head = self._head, None
            self._check(data)
        self._consumer.instanceData(data)

    def end(self) -> None:
        if self._head is not None:
            self._check(self._head)
            self._consumer.instanceData(self._head)
        self._consumer.instanceEnded()

    def _check(self, head: bytes) -> None:
        if head[128:_MAGIC_END] != b"DICM":
            raise MultipartError(f"part {self.count} of {self._what} is not a DICOM Part 10 file")


@implementer(IRetrieval)
class WadoRetrieval:
    def __init__(self, source: DicomWebSource, target: Target, consumer: IInstanceConsumer) -> None:
        self._source = source
        self._target = target
        self._consumer = consumer
        self._reader: StreamReader | None = None
        self._paused = False
        self._stopped = False
        self._work = ensureDeferred(self._run())
        self.done: Deferred[int] = Deferred(lambda _: self.stopProducing())
        self._work.addBoth(lambda result: settle(self.done, result))

    def pauseProducing(self) -> None:
        self._paused = True
        if self._reader is not None:
            self._reader.pause()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._reader is not None:
            self._reader.resume()

    def stopProducing(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._reader is not None:
            self._reader.stop(CancelledError())
        self._work.cancel()

    async def _run(self) -> int:
        server = self._source.server
        name = f"PACS server {server.key}"
        what = self._target.describe()
        response = await self._source.get(self._target)
        if response.code == 404:
            self._source.discard(response)
            raise NotFound(f"{what} not found at {name}")
        if response.code != 200:
            self._source.discard(response)
            raise UpstreamError(f"{name} answered HTTP {response.code} for {what}")
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1")
        media, params = parse_content_type(content_type)
        checker = PartChecker(self._consumer, what)
        if media == "multipart/related":
            boundary = params.get("boundary")
            if not boundary:
                raise UpstreamError(f"{name} sent multipart/related without a boundary for {what}")
            try:
                parser = MultipartParser(boundary.encode("latin-1"), checker.begin, checker.data, checker.end)
            except MultipartError as e:
                raise UpstreamError(f"{name} sent an unusable multipart boundary for {what}: {e}") from None
            feed, close = parser.feed, parser.close
        elif media == "application/dicom":
            checker.begin({})
            feed, close = checker.data, checker.end
        else:
            raise UpstreamError(
                f"{name} answered Content-Type {content_type[:100]!r} for {what}; "
                "expected multipart/related with application/dicom parts"
            )
        self._reader = StreamReader(feed, self._source.clock, server.timeout)
        if self._paused:
            self._reader.pause()
        response.deliverBody(self._reader)
        try:
            await self._reader.finished
            close()
        except MultipartError as e:
            raise UpstreamError(f"{name} sent an invalid multipart body for {what}: {e}") from None
        except IdleTimeout:
            raise UpstreamTimeout(f"{name} sent nothing for {server.timeout:g} s while sending {what}") from None
        except (ConnectionClosed, BodyTooLarge) as e:
            raise UpstreamError(f"{name} broke off sending {what}: {e}") from None
        return checker.count


@implementer(IDicomSource)
class DicomWebSource:
    log = Logger()

    def __init__(self, server, reactor, auth) -> None:
        self.server = server
        self.clock = reactor
        self._auth = auth
        self._upstream = Upstream(reactor, server.ca_file, server.tls_verify)

    def retrieve(self, target: Target, consumer: IInstanceConsumer) -> IRetrieval:
        return WadoRetrieval(self, target, consumer)

    async def get(self, target: Target):
        """GET the WADO-RS URL, signing in again once on a 401."""
        url = self.server.uri + target.path()
        for attempt in (1, 2):
            headers = dict(await self._auth.headers())
            headers["Accept"] = ACCEPT
            response = await self._request(url, headers, target)
            if response.code != 401:
                return response
            self.discard(response)
            if attempt == 2 or not await self._auth.rejected(headers):
                break
        raise UpstreamError(
            f"PACS server {self.server.key} refused our credentials (HTTP 401); "
            "check authType and credentials of this server in servers.json"
        )

    async def _request(self, url: str, headers: dict, target: Target):
        d = self._upstream.client.get(url, headers=headers, unbuffered=True, allow_redirects=False)
        try:
            return await answer_within(d, self.clock, self.server.timeout)
        except NoAnswer:
            raise UpstreamTimeout(
                f"PACS server {self.server.key} did not answer within "
                f"{self.server.timeout:g} s for {target.describe()}"
            ) from None
        except (CancelledError, ProblemError):
            raise
        except Exception as e:
            raise UpstreamError(
                f"PACS server {self.server.key} is unreachable: {describe(Failure(e))}"
            ) from None

    def discard(self, response) -> None:
        """Drop a body we will not read, closing the connection rather than reading it."""
        response.deliverBody(_Discard())

    def close(self) -> Deferred:
        return self._upstream.close()


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


@implementer(IPlugin, IDicomSourceFactory)
class DicomWeb:
    name = "dicomweb"
    schemes = ("http", "https")

    def open(self, server, reactor, auth) -> IDicomSource:
        if not server.tls_verify:
            DicomWebSource.log.warn(
                "TLS certificates of PACS server {key} are NOT verified (tlsVerify: false)",
                key=server.key,
            )
        return DicomWebSource(server, reactor, auth)


dicomweb = DicomWeb()
