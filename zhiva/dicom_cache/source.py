"""
The cache in front of any ``IDicomSource``: a retrieve is served from its
file when there is one, else fetched from the inner source while a ``Fill``
writes it.

A retrieve of a key being filled waits for that fill and then reads the
file; if the fill failed it fetches itself. A hit reads one chunk at a time,
honouring pause/resume, and never holds a series in memory. On a miss the
PACS is paused while the consumer is, or while the disk lags behind.
"""
from __future__ import annotations

from zope.interface import implementer

from zhiva.dicom_cache.cache import DicomCache
from zhiva.dicom_cache.files import Invalid, Reader, entry_name
from zhiva.dicom_cache.fill import Fill
from zhiva.errors import UpstreamError
from zhiva.interfaces import IDicomSource, IInstanceConsumer, IRetrieval
from zhiva.retrieval import CoroutineRetrieval

#: Retrieves of servers with these URI schemes are never cached: they are local already.
LOCAL_SCHEMES = ("file",)


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
class CachedRetrieval(CoroutineRetrieval):
    """
    Serves one target from the cache file, or fetches it from the inner
    source while writing it to a fill (this object is the inner retrieval's
    consumer and passes every call on).
    """

    def __init__(self, source: CachedSource, target, consumer: IInstanceConsumer) -> None:
        super().__init__()
        self._source = source
        self._cache = source.cache
        self._name = entry_name(source.server, target)
        self._target = target
        self._consumer = consumer
        #: True when served from disk, False when fetched; None before it is known.
        self.cached: bool | None = None
        self._inner: IRetrieval | None = None
        self._inner_paused = False
        self._fill: Fill | None = None
        self._start()

    # IRetrieval

    def pauseProducing(self) -> None:
        super().pauseProducing()
        self._steer()

    def resumeProducing(self) -> None:
        super().resumeProducing()
        self._steer()

    def _stopping(self) -> None:
        if self._inner is not None:
            self._inner.stopProducing()

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
                reader = Reader(entry.path)
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

    async def _serve(self, reader: Reader, sizes: list[int]) -> int:
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

