"""
The model request body: instances stream from the source through the
protocol's encoder into the model connection, with backpressure both ways.

The first instance is awaited before the model is called (``prime``), so a
selection with no instance is a 404 and never reaches the model.
"""
from __future__ import annotations

import time
from collections import deque

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from zhiva.errors import NotFound, ProblemError, UpstreamError
from zhiva.limits import FetchCounter
from zhiva.interfaces import IDicomSource, IInstanceConsumer, IPlanEncoder, IRetrieval
from zhiva.selection import Plan


@implementer(IBodyProducer, IInstanceConsumer)
class PlanBody:
    length = UNKNOWN_LENGTH

    def __init__(self, plan: Plan, encoder: IPlanEncoder, source: IDicomSource, limits=None) -> None:
        #: max_instances and max_fetch_bytes (zhiva.limits.Limits), checked as data arrives.
        self._counter = FetchCounter(limits) if limits is not None else None
        self._fetches = plan.fetches
        self._encoder = encoder
        self._source = source
        self._index = -1
        self._instances = 0
        self._retrieval: IRetrieval | None = None
        self._consumer = None
        self._pending: list[bytes] = []
        # Output the consumer has not taken yet: written piece by piece, so a
        # paused model socket holds at most one piece over its own buffer and
        # never gets several MiB in one write (one join, one fresh mmap).
        self._queue: deque[bytes] = deque()
        self._ended = False
        self._paused = False
        self._primed: Deferred[None] | None = None
        self._finished: Deferred[None] | None = None
        self.error: ProblemError | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.instances = 0
        #: Fetches answered by the DICOM cache (zhiva.dicom_cache), for the access log.
        self.cache_hits = 0
        self.done_at: float | None = None
        #: Called once every fetch is complete (the relay's request deadline says so).
        self.on_done = None

    def prime(self) -> Deferred[None]:
        """Start fetching; fires once the first instance has begun to arrive."""
        self._primed = Deferred()
        self._write(self._encoder.begin())
        self._next_fetch()
        return self._primed

    # IBodyProducer

    def startProducing(self, consumer) -> Deferred[None]:
        self._consumer = consumer
        finished = self._finished = Deferred()
        self._queue.extend(self._pending)
        self._pending = []
        if self.error is not None:
            self._finished = None
            finished.errback(self.error)
        else:
            self.resumeProducing()
        return finished

    def pauseProducing(self) -> None:
        self._paused = True
        if self._retrieval is not None:
            self._retrieval.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()
        if not self._paused and self._retrieval is not None:
            self._retrieval.resumeProducing()

    def stopProducing(self) -> None:
        self._finished = None  # must never fire now
        self._queue.clear()
        self.cancel()

    def cancel(self) -> None:
        if self._retrieval is not None:
            retrieval, self._retrieval = self._retrieval, None
            retrieval.stopProducing()

    # IInstanceConsumer

    def instanceStarted(self) -> None:
        self._write(self._encoder.beginInstance(self._instances))
        self._instances += 1
        self.instances += 1
        if self._counter is not None:
            self._counter.instance()
        if self._consumer is None:
            # Hold the PACS until the model is connected: at most the chunk
            # in hand is kept meanwhile.
            self.pauseProducing()
        if self._primed is not None and not self._primed.called:
            self._primed.callback(None)

    def instanceData(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._counter is not None:
            self._counter.data(len(data))
        self._write(self._encoder.instanceData(data))

    def instanceEnded(self) -> None:
        self._write(self._encoder.endInstance())

    # Driving the fetches

    def _next_fetch(self) -> None:
        self._index += 1
        if self._index == len(self._fetches):
            self._retrieval = None
            self.done_at = time.monotonic()
            if self.on_done is not None:
                self.on_done()
            self._write(self._encoder.end())
            if self._primed is not None and not self._primed.called:
                self._fail(NotFound("the request selects no DICOM instance"))
            else:
                self._ended = True
                self._flush()
            return
        fetch = self._fetches[self._index]
        self._instances = 0
        self._write(self._encoder.beginFetch(self._index))
        self._retrieval = self._source.retrieve(fetch.target, self)
        if self._paused:
            self._retrieval.pauseProducing()
        self._retrieval.done.addCallbacks(self._fetched, self._fetch_failed)

    def _fetched(self, count: int) -> None:
        if getattr(self._retrieval, "cached", False):
            self.cache_hits += 1
        fetch = self._fetches[self._index]
        what = fetch.target.describe()
        if count == 0:
            self._fail(NotFound(f"{what} has no instances at the PACS"))
        elif fetch.single and count != 1:
            self._fail(UpstreamError(f"the PACS sent {count} instances for {what}"))
        else:
            self._write(self._encoder.endFetch())
            self._next_fetch()

    def _fetch_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) and self._retrieval is None:
            return  # we stopped it
        if failure.check(ProblemError):
            self._fail(failure.value)
        else:
            self._fail(UpstreamError(f"reading from the PACS failed: {failure.getErrorMessage()}"))

    def _fail(self, error: ProblemError) -> None:
        self.error = error
        self._retrieval = None
        self._queue.clear()
        if self._primed is not None and not self._primed.called:
            self._primed.errback(error)
        elif self._finished is not None:
            finished, self._finished = self._finished, None
            finished.errback(error)

    def _write(self, data: bytes | list[bytes]) -> None:
        pieces = data if isinstance(data, list) else [data]  # zhiva-json writes in pieces
        pieces = [piece for piece in pieces if piece]
        if self._consumer is None:
            self._pending.extend(pieces)
        else:
            self._queue.extend(pieces)
            self._flush()

    def _flush(self) -> None:
        """Hand queued output to the model while it takes it; finish once all is out."""
        while self._queue and not self._paused and self._consumer is not None:
            data = self._queue.popleft()
            self.bytes_out += len(data)
            self._consumer.write(data)  # may pause us at once
        if self._ended and not self._queue and self._finished is not None:
            finished, self._finished = self._finished, None
            finished.callback(None)
