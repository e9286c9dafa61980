"""
The optional on-disk DICOM cache (``--dicom-cache-dir``): a study, series or
instance fetched from a PACS once is read from local disk the next time any
model asks for it, so the PACS is not asked twice.

Why it is built this way:

- One file per retrieve target (a ``Fetch`` of the plan), named by a hash of
  the server (its key, ``uri``, ``authType`` and ``login``: never a secret)
  and the UIDs. Another server, or the same key pointed at another PACS,
  never answers from it. A file is the instances back to back, a JSON
  footer listing their sizes, the footer's length and a magic number.
- A fill writes under a temporary name (``.fill-*``) and renames it into
  place only after the retrieve succeeded and the file was synced, so a
  failed, cancelled or crashed fill is never visible. A file whose footer
  does not add up (truncated, foreign) is never served and is deleted, and
  temporary files left by a crash are removed at start.
- One fill per key at a time. A retrieve of a key being filled waits for the
  fill and then reads the file; if the fill failed it fetches itself.
- Disk I/O runs in the cache's own small thread pool, never on the reactor.
  A fill writes what arrived while the same data flows on to the model; if
  writing lags by more than ``backlog_limit`` bytes the PACS is paused, so
  memory stays bounded. A hit reads one chunk at a time, honouring
  pause/resume, and never holds a series in memory.
- LRU eviction by total size. Last use is kept in memory and in the file's
  atime, so the order survives a restart. Age is measured on the reactor
  clock. The size cap counts committed entries; fills in progress come on top.
- The directory is made 0700 and the files 0600: they hold patient data.
  One proxy per directory: two would not see each other's entries.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from zhiva.errors import UpstreamError
from zhiva.interfaces import IDicomSource, IInstanceConsumer, IRetrieval
from zhiva.retrieval import settle

DEFAULT_MAX_BYTES = 10 << 30  # --dicom-cache-size "10G"
DEFAULT_TTL = 3600.0
#: Bytes read from disk per worker-thread call on a hit.
CHUNK_SIZE = 256 * 1024
#: Bytes a fill may have waiting for the disk before the PACS is paused.
BACKLOG_LIMIT = 4 << 20
SUFFIX = ".dcmc"
PARTIAL_PREFIX = ".fill-"
MAGIC = b"ZHIVAC01"
_TRAILER = struct.Struct(">Q8s")  # footer length, magic
_MAGIC_END = 132  # Part 10: 128-byte preamble, then "DICM"
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
#: Retrieves of servers with these URI schemes are never cached: they are local already.
LOCAL_SCHEMES = ("file",)


def entry_name(server, target) -> str:
    """The file name (without suffix) of ``target`` at ``server``."""
    identity = [
        server.key, server.uri, server.auth_type, server.login or "",
        target.study, target.series, target.instance,
    ]
    return hashlib.sha256(json.dumps(identity).encode("utf-8")).hexdigest()


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


class Invalid(Exception):
    """A cache file that must not be served."""


# -- worker-thread side --------------------------------------------------------


def read_footer(f, size: int) -> list[int]:
    """The instance sizes of an entry file, or ``Invalid`` saying what is wrong."""
    if size < _TRAILER.size:
        raise Invalid("shorter than its trailer")
    f.seek(size - _TRAILER.size)
    length, magic = _TRAILER.unpack(f.read(_TRAILER.size))
    if magic != MAGIC:
        raise Invalid("no trailer: a partial or foreign file")
    if length > size - _TRAILER.size:
        raise Invalid("its footer is longer than the file")
    data_end = size - _TRAILER.size - length
    f.seek(data_end)
    try:
        footer = json.loads(f.read(length))
    except ValueError:
        raise Invalid("its footer is not JSON") from None
    sizes = footer.get("sizes") if isinstance(footer, dict) else None
    if not isinstance(sizes, list) or not sizes or not all(
        type(s) is int and s >= _MAGIC_END for s in sizes
    ):
        raise Invalid("its footer lists no usable instance sizes")
    if sum(sizes) != data_end:
        raise Invalid(f"holds {data_end} bytes of instances, its footer says {sum(sizes)}")
    return sizes


def scan(directory: Path) -> tuple[list[tuple[str, int, float, float]], int, int]:
    """
    Worker thread, at start: the valid entries as (name, size, mtime, atime),
    and how many partial and invalid files were deleted.
    """
    entries, partial, invalid = [], 0, 0
    with os.scandir(directory) as items:
        for item in items:
            if item.name.startswith(PARTIAL_PREFIX):
                _unlink(item.path)
                partial += 1
                continue
            if not item.name.endswith(SUFFIX) or not item.is_file(follow_symlinks=False):
                continue
            try:
                with open(item.path, "rb") as f:
                    st = os.fstat(f.fileno())
                    read_footer(f, st.st_size)
            except (OSError, Invalid):
                _unlink(item.path)
                invalid += 1
                continue
            entries.append((item.name[: -len(SUFFIX)], st.st_size, st.st_mtime, st.st_atime))
    return entries, partial, invalid


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sync_directory(path: Path) -> None:
    """Make a rename durable; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Reader:
    """An entry file read one chunk at a time from worker threads; closed exactly once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        self._closed = False

    def open(self) -> list[int]:
        """Check the whole layout before anything is served; mark the file used."""
        with self._lock:
            if self._closed:
                raise CancelledError()
            f = open(self.path, "rb")
            try:
                st = os.fstat(f.fileno())
                sizes = read_footer(f, st.st_size)
                offset = 0
                for i, size in enumerate(sizes):
                    f.seek(offset + 128)
                    if f.read(4) != b"DICM":
                        raise Invalid(f"instance {i} is not a DICOM Part 10 file")
                    offset += size
                f.seek(0)
                try:
                    os.utime(f.fileno(), ns=(time.time_ns(), st.st_mtime_ns))
                except OSError:
                    pass
            except BaseException:
                f.close()
                raise
            self._file = f
            return sizes

    def read(self, size: int) -> bytes:
        with self._lock:
            if self._file is None:
                return b""
            return self._file.read(size)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                file, self._file = self._file, None
                file.close()


class _Writer:
    """The temporary file of one fill; its methods run in worker threads, one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def write(self, chunks: list[bytes]) -> None:
        if self._fd is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            self._fd = os.open(self.path, flags, FILE_MODE)
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self._fd, view):]

    def commit(self, final: Path, sizes: list[int]) -> int:
        """Footer last, sync, rename into place; returns the file's size."""
        footer = json.dumps({"v": 1, "sizes": sizes}, separators=(",", ":")).encode("ascii")
        self.write([footer, _TRAILER.pack(len(footer), MAGIC)])
        assert self._fd is not None
        os.fsync(self._fd)
        size = os.fstat(self._fd).st_size
        os.close(self._fd)
        self._fd = None
        os.replace(self.path, final)
        _sync_directory(final.parent)
        return size

    def abort(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        _unlink(self.path)


# -- reactor side --------------------------------------------------------------


@dataclass
class Entry:
    name: str
    path: Path
    size: int
    #: When it was filled, on the cache's clock.
    created: float


class Fill:
    """
    One retrieve being written to disk: data is queued as it arrives and
    written by one worker-thread call at a time, in order; ``finish`` commits
    or aborts once every write is done.
    """

    def __init__(self, cache: DicomCache, name: str) -> None:
        self.cache = cache
        self.name = name
        #: The data is as old as its fetch: the entry's TTL counts from here.
        self.started_at = cache.clock.seconds()
        self._writer = _Writer(cache.directory / f"{PARTIAL_PREFIX}{name}.{secrets.token_hex(4)}")
        self._queue: list[bytes] = []
        self._queued = 0
        self._writing = 0
        self._busy = False
        self._end: str | None = None  # "commit" or "abort", once the retrieve ended
        self._waiters: list[Deferred] = []
        self.sizes: list[int] = []
        self.size = 0
        #: Why this fill will not be committed (too large, a write failed), or None.
        self.dropped: str | None = None
        #: Called when the backlog falls back under the limit.
        self.on_drained = None

    @property
    def backlog(self) -> int:
        return self._queued + self._writing

    @property
    def congested(self) -> bool:
        return self.backlog > self.cache.backlog_limit

    def wait(self) -> Deferred[None]:
        """Fires when this fill is committed or given up."""

        def cancel(d: Deferred) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        d: Deferred[None] = Deferred(cancel)
        self._waiters.append(d)
        return d

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

    def drop(self, reason: str, too_large: bool = False) -> None:
        """Give up writing; whoever waits for this fill fetches for itself now."""
        if self.dropped is not None:
            return
        self.dropped = reason
        self._queue, self._queued = [], 0
        self.cache._released(self, too_large)
        self._release_waiters()
        self._drained()
        self._kick()

    def finish(self, ok: bool) -> None:
        """The retrieve ended: commit what was written if it succeeded, else delete it."""
        self.on_drained = None
        if self._end is None:
            self._end = "commit" if ok else "abort"
            self._kick()

    def _kick(self) -> None:
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
            path=str(self._writer.path), error=_reason(failure),
        )
        self.drop(f"write failed: {_reason(failure)}")

    def _committed(self, size: int) -> None:
        self._busy = False
        self.cache._filled(self, size)
        self._release_waiters()

    def _commit_failed(self, failure: Failure) -> None:
        self._busy = False
        self.cache.log.warn(
            "DICOM cache: committing {path} failed ({error}); this retrieve is not cached",
            path=str(self._writer.path), error=_reason(failure),
        )
        self.dropped = f"commit failed: {_reason(failure)}"
        self._end = "abort"
        self._kick()

    def _aborted(self, result) -> None:
        self._busy = False
        if isinstance(result, Failure):
            self.cache.log.warn(
                "DICOM cache: deleting {path} failed ({error})",
                path=str(self._writer.path), error=_reason(result),
            )
        self.cache._filled(self, None)
        self._release_waiters()

    def _drained(self) -> None:
        if self.on_drained is not None and not self.congested:
            self.on_drained()

    def _release_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


def _reason(failure: Failure) -> str:
    value = failure.value
    return getattr(value, "strerror", None) or str(value) or type(value).__name__


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
        self._too_large: dict[str, float] = {}
        self._removing: dict[str, list] = {}  # name -> callbacks to run once its file is gone
        self._state = "new"  # then "scanning", "ready" or "broken"
        self._ready_waiters: list[Deferred] = []
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
            self._entries[name] = Entry(name, self.path(name), size, created)
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
            directory=str(self.directory), error=_reason(failure),
        )
        self._set_state("broken")

    def _set_state(self, state: str) -> None:
        self._state = state
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)

    def ready(self) -> Deferred[None]:
        """Fires once the directory has been scanned (or found unusable)."""
        if self._state in ("ready", "broken"):
            return succeed(None)

        def cancel(d: Deferred) -> None:
            if d in self._ready_waiters:
                self._ready_waiters.remove(d)

        d: Deferred[None] = Deferred(cancel)
        self._ready_waiters.append(d)
        return d

    @property
    def usable(self) -> bool:
        return self._state == "ready"

    # Entries

    def path(self, name: str) -> Path:
        return self.directory / (name + SUFFIX)

    def io(self, function, *args) -> Deferred:
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

    def _evict(self, name: str, reason: str, count: bool = True) -> None:
        entry = self._entries.pop(name)
        self.bytes -= entry.size
        if count:
            self.evictions[reason] += 1
        self._removing.setdefault(name, [])

        def removed(result) -> None:
            if isinstance(result, Failure):
                self.log.warn(
                    "DICOM cache: deleting {path} failed ({error})",
                    path=str(entry.path), error=_reason(result),
                )
            for then in self._removing.pop(name, []):
                then()

        self.io(_unlink, entry.path).addBoth(removed)

    def _released(self, fill: Fill, too_large: bool) -> None:
        if self._fills.get(fill.name) is fill:
            del self._fills[fill.name]
        if too_large:
            self._too_large[fill.name] = self.clock.seconds()

    def _filled(self, fill: Fill, size: int | None) -> None:
        self._released(fill, False)
        self._unfinished.discard(fill)
        if size is None:
            self.fills["dropped"] += 1
            return
        self.fills["committed"] += 1
        old = self._entries.get(fill.name)
        if old is not None:  # cannot happen (one fill per name), but keep the sum right
            self.bytes -= old.size
        self._entries[fill.name] = Entry(fill.name, self.path(fill.name), size, fill.started_at)
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


@implementer(IDicomSource)
class CachedSource:
    """Any ``IDicomSource`` with the cache in front of it."""

    def __init__(self, inner, cache: DicomCache, server) -> None:
        self.inner = inner
        self.cache = cache
        self.server = server

    def retrieve(self, target, consumer: IInstanceConsumer) -> IRetrieval:
        return CachedRetrieval(self, target, consumer)

    def close(self):
        return self.inner.close()

    @property
    def refresh(self):
        """The inner source's ``refresh`` (a folder re-indexes on SIGHUP), or None."""
        return getattr(self.inner, "refresh", None)


@implementer(IRetrieval, IInstanceConsumer)
class CachedRetrieval:
    """
    Serves one target from the cache file, or fetches it from the inner
    source while writing it to a fill (this object is the inner retrieval's
    consumer and passes every call on).
    """

    def __init__(self, source: CachedSource, target, consumer: IInstanceConsumer) -> None:
        self._source = source
        self._cache = source.cache
        self._name = entry_name(source.server, target)
        self._target = target
        self._consumer = consumer
        #: True when served from disk, False when fetched; None before it is known.
        self.cached: bool | None = None
        self._paused = False
        self._stopped = False
        self._resumed: Deferred[None] | None = None
        self._waiting: Deferred | None = None
        self._inner: IRetrieval | None = None
        self._inner_paused = False
        self._fill: Fill | None = None
        self._work = ensureDeferred(self._run())
        self.done: Deferred[int] = Deferred(lambda _: self.stopProducing())
        self._work.addBoth(lambda result: settle(self.done, result))

    # IRetrieval

    def pauseProducing(self) -> None:
        self._paused = True
        self._steer()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.callback(None)
        self._steer()

    def stopProducing(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._inner is not None:
            self._inner.stopProducing()
        if self._waiting is not None:
            self._waiting.cancel()

    # IInstanceConsumer: what the inner source sends on a miss

    def instanceStarted(self) -> None:
        self._consumer.instanceStarted()
        if self._fill is not None:
            self._fill.started()

    def instanceData(self, data: bytes) -> None:
        self._consumer.instanceData(data)
        if self._fill is not None:
            self._fill.data(data)
            self._steer()

    def instanceEnded(self) -> None:
        self._consumer.instanceEnded()

    # The work

    async def _run(self) -> int:
        cache = self._cache
        await self._wait(cache.ready())
        while cache.usable:
            entry = cache.lookup(self._name)
            if entry is not None:
                reader = _Reader(entry.path)
                try:
                    sizes = await self._wait(cache.io(reader.open))
                except (OSError, Invalid) as e:
                    cache.discard(self._name, entry, e)
                    continue
                except BaseException:
                    cache.io(reader.close)
                    raise
                return await self._serve(reader, sizes)
            fill = cache.filling(self._name)
            if fill is None:
                break
            await self._wait(fill.wait())
        if cache.usable and not cache.too_large(self._name):
            self._fill = cache.start_fill(self._name)
            self._fill.on_drained = self._steer
        return await self._fetch()

    async def _serve(self, reader: _Reader, sizes: list[int]) -> int:
        cache = self._cache
        self.cached = True
        cache.hits += 1
        try:
            for size in sizes:
                await self._unpaused()
                self._consumer.instanceStarted()
                self._check()
                left = size
                while left:
                    data = await self._wait(cache.io(reader.read, min(cache.chunk_size, left)))
                    if not data:
                        raise UpstreamError(
                            f"the DICOM cache file of {self._target.describe()} ended early; "
                            "it changed while being read"
                        )
                    await self._unpaused()
                    self._consumer.instanceData(data)
                    self._check()
                    left -= len(data)
                self._consumer.instanceEnded()
                self._check()
        finally:
            cache.io(reader.close)
        return len(sizes)

    async def _fetch(self) -> int:
        self.cached = False
        self._cache.misses += 1
        self._inner = self._source.inner.retrieve(self._target, self)
        self._steer()
        fill = self._fill
        try:
            count = await self._wait(self._inner.done)
        except BaseException:
            if fill is not None:
                fill.finish(False)
            raise
        finally:
            self._inner = None
        if fill is not None:
            fill.finish(count > 0)
        return count

    def _steer(self) -> None:
        """Pause the inner retrieval while our consumer is paused or the disk lags."""
        if self._inner is None or self._stopped:
            return
        pause = self._paused or (self._fill is not None and self._fill.congested)
        if pause != self._inner_paused:
            self._inner_paused = pause
            if pause:
                self._inner.pauseProducing()
            else:
                self._inner.resumeProducing()

    async def _wait(self, d: Deferred):
        self._check()
        self._waiting = d
        try:
            return await d
        finally:
            self._waiting = None

    def _check(self) -> None:
        if self._stopped:
            raise CancelledError()

    async def _unpaused(self) -> None:
        self._check()
        while self._paused:
            self._resumed = Deferred()
            await self._wait(self._resumed)
