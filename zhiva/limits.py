"""
The proxy's caps (twistd options, safe defaults) and the per-model gate that
bounds concurrent requests to one model with a bounded waiting queue.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from twisted.internet.defer import Deferred

from zhiva.errors import ServiceUnavailable, TooMuchData


@dataclass(frozen=True)
class Limits:
    #: Longest request target (path and query) in bytes; longer: 414.
    max_url_length: int = 8192
    #: Request line plus all header lines in bytes; more: 400 and close (Twisted's answer).
    max_header_bytes: int = 32768
    #: Instances one request may send to a model; more: 413.
    max_instances: int = 5000
    #: DICOM bytes one request may fetch from the PACS; more: 413.
    max_fetch_bytes: int = 4 << 30
    #: Bytes a model's answer may have; more: 502. A segmentation of a big
    #: series is ~100 MB of JSON: leave room.
    max_result_bytes: int = 1 << 30
    #: Requests one model gets at once; the others wait in its queue.
    model_concurrency: int = 4
    #: Requests that may wait for one model; more: 503 at once.
    model_queue: int = 32
    #: Seconds a request waits in a model's queue before a 503.
    queue_timeout: float = 120.0
    #: Retry-After (seconds) of those 503s.
    retry_after: int = 30
    #: Seconds one request may hold a model slot in all (PACS fetch, model
    #: call, answer); more: 504. The per-upstream timeouts only bound the wait
    #: for the next byte, so an upstream that drips just fast enough would
    #: otherwise hold the slot forever.
    max_request_seconds: float = 3600.0


class ModelGate:
    """At most ``concurrency`` holders per model; ``queue`` waiters at most, each for ``timeout`` s."""

    def __init__(self, clock, concurrency: int, queue: int, timeout: float, retry_after: int) -> None:
        self._clock = clock
        self._concurrency = concurrency
        self._queue_size = queue
        self._timeout = timeout
        self._retry_after = retry_after
        self._active: dict[str, int] = {}
        self._waiting: dict[str, deque[Deferred]] = {}

    def active(self, key: str) -> int:
        return self._active.get(key, 0)

    def waiting(self, key: str) -> int:
        return len(self._waiting.get(key, ()))

    def _busy(self, key: str, why: str) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"model {key} is busy ({self._concurrency} request(s) running{why}); try again later",
            headers={"Retry-After": str(self._retry_after)},
        )

    def acquire(self, key: str) -> Deferred[None]:
        if self.active(key) < self._concurrency and not self.waiting(key):
            self._active[key] = self.active(key) + 1
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        queue = self._waiting.setdefault(key, deque())
        if len(queue) >= self._queue_size:
            d = Deferred()
            d.errback(self._busy(key, f", {len(queue)} waiting: the queue is full"))
            return d

        def cancelled(d: Deferred) -> None:
            if timer.active():
                timer.cancel()
            self._forget(key, d)

        waiter: Deferred[None] = Deferred(cancelled)

        def expire() -> None:
            self._forget(key, waiter)
            waiter.errback(self._busy(key, f"; waited {self._timeout:g} s in the queue"))

        timer = self._clock.callLater(self._timeout, expire)
        waiter.addBoth(_stop_timer, timer)
        queue.append(waiter)
        return waiter

    def release(self, key: str) -> None:
        queue = self._waiting.get(key)
        if queue:
            waiter = queue.popleft()
            if not queue:
                del self._waiting[key]
            waiter.callback(None)  # the slot passes straight on
            return
        left = self._active[key] - 1
        if left:
            self._active[key] = left
        else:
            del self._active[key]

    def _forget(self, key: str, waiter: Deferred) -> None:
        queue = self._waiting.get(key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[key]


def _stop_timer(result, timer):
    if timer.active():
        timer.cancel()
    return result


class FetchCounter:
    """Counts one request's instances and DICOM bytes as they stream; raises at the caps."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self.instances = 0
        self.bytes = 0

    def instance(self) -> None:
        self.instances += 1
        if self.instances > self._limits.max_instances:
            raise TooMuchData(
                f"the request selects more than {self._limits.max_instances} instances "
                "(--max-instances); ask for a series or use data-filters"
            )

    def data(self, size: int) -> None:
        self.bytes += size
        if self.bytes > self._limits.max_fetch_bytes:
            raise TooMuchData(
                f"the request fetches more than {self._limits.max_fetch_bytes} bytes of DICOM "
                "from the PACS (--max-fetch-bytes)"
            )
