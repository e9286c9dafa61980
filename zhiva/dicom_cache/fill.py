"""
One retrieve being written to the cache while the same data flows on to the
model.

Data is queued as it arrives and written by one worker-thread call at a
time, in order, so memory holds at most what the disk has not taken yet:
above the cache's ``backlog_limit`` the fill is ``congested`` and the
retrieval pauses the PACS until ``on_drained``. The file is committed only
when the retrieve succeeded; anything else deletes it. Whoever waits for the
fill (another retrieve of the same key) is released when it is committed or
given up, and then reads the file or fetches for itself.
"""
from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from zhiva.dicom_cache.files import PARTIAL_PREFIX, Writer, reason

if TYPE_CHECKING:
    from zhiva.dicom_cache.cache import DicomCache


class Waiters:
    """Deferreds fired together once something is over; a cancelled one just leaves."""

    def __init__(self) -> None:
        self._waiting: list[Deferred] = []

    def wait(self) -> Deferred[None]:
        def cancel(d: Deferred) -> None:
            if d in self._waiting:
                self._waiting.remove(d)

        d: Deferred[None] = Deferred(cancel)
        self._waiting.append(d)
        return d

    def release(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


class Fill:
    """One retrieve being written to disk; ``finish`` commits or aborts once every write is done."""

    def __init__(self, cache: DicomCache, name: str) -> None:
        self.cache = cache
        self.name = name
        #: The data is as old as its fetch: the entry's TTL counts from here.
        self.started_at = cache.clock.seconds()
        self._writer = Writer(cache.directory / f"{PARTIAL_PREFIX}{name}.{secrets.token_hex(4)}")
        self._queue: list[bytes] = []
        self._queued = 0
        self._writing = 0
        self._busy = False
        self._end: str | None = None  # "commit" or "abort" once the retrieve ended, then "done"
        self._waiters = Waiters()
        self.sizes: list[int] = []
        self.size = 0
        #: Why this fill will not be committed (too large, a write failed), or None.
        self.dropped: str | None = None
        #: Called when the backlog falls back under the limit.
        self.on_drained = None

    @property
    def congested(self) -> bool:
        return self._queued + self._writing > self.cache.backlog_limit

    def wait(self) -> Deferred[None]:
        """Fires when this fill is committed or given up."""
        return self._waiters.wait()

    def started(self) -> None:
        self.sizes.append(0)

    def data(self, data: bytes) -> None:
        if self.dropped is not None:
            return
        self.size += len(data)
        self.sizes[-1] += len(data)
        if self.size > self.cache.max_bytes:
            self.drop("larger than the whole cache (--dicom-cache-size)", too_large=True)
            return
        self._queue.append(data)
        self._queued += len(data)
        self._kick()

    def drop(self, why: str, too_large: bool = False) -> None:
        """Give up writing; whoever waits for this fill fetches for itself now."""
        if self.dropped is not None:
            return
        self.dropped = why
        self._queue, self._queued = [], 0
        self.cache.fill_released(self, too_large)
        self._waiters.release()
        self._drained()
        self._kick()

    def finish(self, ok: bool) -> None:
        """The retrieve ended: commit what was written if it succeeded, else delete it."""
        self.on_drained = None
        if self._end is None:
            self._end = "commit" if ok else "abort"
            self._kick()

    def _kick(self) -> None:
        """Start the next disk call, unless one is running: a write, else the commit or abort."""
        if self._busy:
            return
        if self._queue and self.dropped is None:
            chunks, self._queue = self._queue, []
            self._writing, self._queued = self._queued, 0
            self._busy = True
            self.cache.io(self._writer.write, chunks).addCallbacks(self._wrote, self._write_failed)
        elif self._end == "commit" and self.dropped is None:
            if self.cache.removing(self.name, self._kick):
                return  # an old file of this name is being deleted: commit after that
            self._busy = True
            final = self.cache.path(self.name)
            self.cache.io(self._writer.commit, final, self.sizes).addCallbacks(
                self._committed, self._commit_failed
            )
        elif self._end in ("commit", "abort"):
            self._end = "done"
            self._busy = True
            self.cache.io(self._writer.abort).addBoth(self._aborted)

    def _wrote(self, _) -> None:
        self._busy = False
        self._writing = 0
        self._drained()
        self._kick()

    def _write_failed(self, failure: Failure) -> None:
        self._busy = False
        self._writing = 0
        self.cache.log.warn(
            "DICOM cache: writing {path} failed ({error}); this retrieve is not cached",
            path=str(self._writer.path), error=reason(failure),
        )
        self.drop(f"write failed: {reason(failure)}")

    def _committed(self, size: int) -> None:
        self._busy = False
        self.cache.fill_ended(self, size)
        self._waiters.release()

    def _commit_failed(self, failure: Failure) -> None:
        self._busy = False
        self.cache.log.warn(
            "DICOM cache: committing {path} failed ({error}); this retrieve is not cached",
            path=str(self._writer.path), error=reason(failure),
        )
        self.dropped = f"commit failed: {reason(failure)}"
        self._end = "abort"
        self._kick()

    def _aborted(self, result) -> None:
        self._busy = False
        if isinstance(result, Failure):
            self.cache.log.warn(
                "DICOM cache: deleting {path} failed ({error})",
                path=str(self._writer.path), error=reason(result),
            )
        self.cache.fill_ended(self, None)
        self._waiters.release()

    def _drained(self) -> None:
        if self.on_drained is not None and not self.congested:
            self.on_drained()
