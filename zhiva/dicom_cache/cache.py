"""
The cache service: the directory, its index in memory, and the thread pool
doing its disk I/O.

- The index is read from the directory at start (``scan``); until then, or
  when the directory cannot be read, retrieves go to the PACS uncached.
- LRU eviction by total size. Last use is kept in memory and in the file's
  atime, so the order survives a restart. The size cap counts committed
  entries; fills in progress come on top.
- Age is measured on the reactor clock from the fetch; expired entries are
  deleted by a periodic sweep, not only when asked for, since they hold
  patient data.
- One fill per name at a time (``start_fill``/``filling``); a fill that
  outgrew the whole cache is remembered for the TTL, so the next retrieve of
  it does not try again.
- Disk I/O runs in the cache's own small thread pool, never on the reactor.
  One proxy per directory: two would not see each other's entries.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from zhiva.dicom_cache.files import DIRECTORY_MODE, SUFFIX, Invalid, reason, scan, unlink
from zhiva.dicom_cache.fill import Fill, Waiters

DEFAULT_MAX_BYTES = 10 << 30  # --dicom-cache-size "10G"
DEFAULT_TTL = 3600.0
#: Bytes read from disk per worker-thread call on a hit.
CHUNK_SIZE = 256 * 1024
#: Bytes a fill may have waiting for the disk before the PACS is paused.
BACKLOG_LIMIT = 4 << 20


def parse_size(text: str) -> int:
    """``--dicom-cache-size``: bytes, or a number with K, M, G or T (powers of 1024)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    if value and value[-1] in "KMGT":
        scale = 1024 ** ("KMGT".index(value[-1]) + 1)
        value = value[:-1]
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a size such as 10G or 500M") from None
    if not number > 0:
        raise ValueError(f"{text!r} must be more than 0")
    return int(number * scale)


@dataclass
class Entry:
    """A committed file, indexed by its name."""

    path: Path
    size: int
    #: When it was filled, on the cache's clock.
    created: float


class DicomCache(Service):
    """The cache directory, its index in memory and the thread pool doing its I/O."""

    log = Logger()

    def __init__(
        self,
        directory,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl: float = DEFAULT_TTL,
        reactor=None,
        clock=None,
        threads: int = 2,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.chunk_size = CHUNK_SIZE
        self.backlog_limit = BACKLOG_LIMIT
        self._reactor = reactor
        #: Ages and TTL run on this clock (a ``Clock`` in tests).
        self.clock = clock if clock is not None else reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="zhiva-dicom-cache")
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._fills: dict[str, Fill] = {}  # by name: the fill others may wait for
        self._unfinished: set[Fill] = set()  # every fill not yet committed or deleted
        self._too_large: dict[str, float] = {}  # name -> when a fill of it outgrew the cache
        self._removing: dict[str, list] = {}  # name -> callbacks to run once its file is gone
        self._state = "new"  # then "scanning", "ready" or "broken"
        self._ready_waiters = Waiters()
        self._sweeper: LoopingCall | None = None
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = {"size": 0, "expired": 0, "invalid": 0}
        self.fills = {"committed": 0, "dropped": 0}

    # Life cycle

    def prepare(self) -> None:
        """Create the directory owner-only; raise ``OSError`` when it cannot be used."""
        self.directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        if os.stat(self.directory).st_mode & 0o777 != DIRECTORY_MODE:
            os.chmod(self.directory, DIRECTORY_MODE)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable by this user", str(self.directory))

    def startService(self) -> None:
        super().startService()
        self._pool.start()
        self._state = "scanning"
        self.io(scan, self.directory).addCallbacks(self._scanned, self._scan_failed)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(min(self.ttl, 60.0), now=False)

    def stopService(self):
        super().stopService()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._pool.stop()

    def _scanned(self, found) -> None:
        entries, partial, invalid = found
        now, wall = self.clock.seconds(), time.time()
        for name, size, mtime, atime in sorted(entries, key=lambda e: e[3]):
            created = now - max(0.0, wall - mtime)
            self._entries[name] = Entry(self.path(name), size, created)
            self.bytes += size
        self.evictions["invalid"] += invalid
        self.log.info(
            "DICOM cache {directory}: {count} entries, {size} bytes; removed {partial} "
            "unfinished and {invalid} invalid file(s)",
            directory=str(self.directory), count=len(entries), size=self.bytes,
            partial=partial, invalid=invalid,
        )
        self._set_state("ready")
        self.sweep()
        self._shrink()

    def _scan_failed(self, failure: Failure) -> None:
        self.log.error(
            "DICOM cache {directory} cannot be read ({error}); retrieves go to the PACS uncached",
            directory=str(self.directory), error=reason(failure),
        )
        self._set_state("broken")

    def _set_state(self, state: str) -> None:
        self._state = state
        self._ready_waiters.release()

    def ready(self) -> Deferred[None]:
        """Fires once the directory has been scanned (or found unusable)."""
        if self._state in ("ready", "broken"):
            return succeed(None)
        return self._ready_waiters.wait()

    @property
    def usable(self) -> bool:
        return self._state == "ready"

    # Entries

    def path(self, name: str) -> Path:
        return self.directory / (name + SUFFIX)

    def io(self, function, *args) -> Deferred:
        """Run ``function`` in the cache's thread pool."""
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    def lookup(self, name: str) -> Entry | None:
        """The fresh entry ``name``, now the most recently used; None when absent or expired."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        if self._expired(entry):
            self._evict(name, "expired")
            return None
        self._entries.move_to_end(name)
        return entry

    def filling(self, name: str) -> Fill | None:
        return self._fills.get(name)

    def too_large(self, name: str) -> bool:
        """A recent fill of ``name`` outgrew the cache: fetch it uncached, without waiting."""
        since = self._too_large.get(name)
        return since is not None and self.clock.seconds() - since < self.ttl

    def start_fill(self, name: str) -> Fill:
        fill = self._fills[name] = Fill(self, name)
        self._unfinished.add(fill)
        return fill

    def discard(self, name: str, entry: Entry, error: BaseException) -> None:
        """``entry`` failed to open: never serve it again."""
        if isinstance(error, Invalid):
            self.log.warn(
                "DICOM cache: {path} is invalid ({error}); deleted, fetching again",
                path=str(entry.path), error=str(error),
            )
        if self._entries.get(name) is entry:  # else: already evicted meanwhile
            self._evict(name, "invalid", count=isinstance(error, Invalid))

    def removing(self, name: str, then) -> bool:
        """True (and ``then`` is called later) while the old file of ``name`` is being deleted."""
        if name not in self._removing:
            return False
        self._removing[name].append(then)
        return True

    def sweep(self) -> None:
        """Delete expired entries: patient data is not kept past its TTL."""
        for name, entry in list(self._entries.items()):
            if self._expired(entry):
                self._evict(name, "expired")
        now = self.clock.seconds()
        for name, since in list(self._too_large.items()):
            if now - since >= self.ttl:
                del self._too_large[name]

    def _expired(self, entry: Entry) -> bool:
        return self.clock.seconds() - entry.created >= self.ttl

    def _evict(self, name: str, why: str, count: bool = True) -> None:
        entry = self._entries.pop(name)
        self.bytes -= entry.size
        if count:
            self.evictions[why] += 1
        self._removing.setdefault(name, [])

        def removed(result) -> None:
            if isinstance(result, Failure):
                self.log.warn(
                    "DICOM cache: deleting {path} failed ({error})",
                    path=str(entry.path), error=reason(result),
                )
            for then in self._removing.pop(name, []):
                then()

        self.io(unlink, entry.path).addBoth(removed)

    # Called by Fill

    def fill_released(self, fill: Fill, too_large: bool) -> None:
        """Retrieves of ``fill.name`` no longer wait for ``fill``."""
        if self._fills.get(fill.name) is fill:
            del self._fills[fill.name]
        if too_large:
            self._too_large[fill.name] = self.clock.seconds()

    def fill_ended(self, fill: Fill, size: int | None) -> None:
        """``fill`` is over: committed as a file of ``size`` bytes, or deleted (None)."""
        self.fill_released(fill, False)
        self._unfinished.discard(fill)
        if size is None:
            self.fills["dropped"] += 1
            return
        self.fills["committed"] += 1
        old = self._entries.get(fill.name)
        if old is not None:  # cannot happen (one fill per name), but keep the sum right
            self.bytes -= old.size
        self._entries[fill.name] = Entry(self.path(fill.name), size, fill.started_at)
        self._entries.move_to_end(fill.name)
        self.bytes += size
        self._shrink()

    def _shrink(self) -> None:
        """Evict the least recently used entries until the total fits the cap."""
        while self.bytes > self.max_bytes and self._entries:
            self._evict(next(iter(self._entries)), "size")

    def stats(self) -> dict:
        """Counters for the status page and /metrics."""
        return {
            "enabled": True,
            "directory": str(self.directory),
            "maxBytes": self.max_bytes,
            "ttl": self.ttl,
            "state": self._state,
            "entries": len(self._entries),
            "bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "filling": len(self._unfinished),
            "deleting": len(self._removing),
            "fills": dict(self.fills),
            "evictions": dict(self.evictions),
        }
