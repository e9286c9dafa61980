"""
The folder source: a directory tree of DICOM Part 10 files acting as the PACS,
for ``file:`` server URIs of servers.json.

    "uri": "file:///srv/dicom"

The URI must name an absolute path (``file:///abs/path``, or
``file://localhost/abs/path``); percent-escapes are decoded
(``file:///srv/my%20cases``). Files may sit at any depth and have any name.
Entries whose name starts with a dot (``.git``, ``.DS_Store``) are ignored
silently; every other file that is not a usable DICOM Part 10 file is
skipped with one warning naming it and saying why. ``authType`` is ignored.

The index (StudyInstanceUID -> SeriesInstanceUID -> SOPInstanceUID -> file)
is built from file headers only, in a worker thread, when the source is
opened; a retrieve arriving before it is complete waits for it. ``refresh()``
rebuilds it (the service calls it on SIGHUP): headers of files whose size,
mtime and inode did not change are not read again, and the new index
replaces the old one whole once complete. Retrieves answer as a DICOMweb
PACS would: every instance under the study, series or instance, series by
series (SeriesNumber, then UID) and within a series by InstanceNumber, then
path; each file is sent as its bytes on disk, read in worker threads one
chunk at a time.
"""
from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from zhiva.errors import NotFound, ProblemError, UpstreamError
from zhiva.interfaces import IDicomSource, IDicomSourceFactory, IInstanceConsumer, IRetrieval
from zhiva.retrieval import CoroutineRetrieval
from zhiva.selection import Target, is_uid

#: Bytes read from disk per worker-thread call and passed on per instanceData.
CHUNK_SIZE = 256 * 1024
# Part 10: a 128-byte preamble, then the magic.
_MAGIC_END = 132
_HEADER_TAGS = {
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "SOPInstanceUID": 0x00080018,
    "SeriesNumber": 0x00200011,
    "InstanceNumber": 0x00200013,
    "Rows": 0x00280010,  # an image: its pixel data must be there
}
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
# Explicit VR elements with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}


def folder_path(uri: str) -> Path:
    """
    The directory named by a ``file:`` URI; ``ValueError`` saying how to
    write it when it is not an absolute local path.
    """
    parts = urlsplit(uri)
    if parts.scheme.lower() != "file":
        raise ValueError(f"is not a file: URI: {uri!r}")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"names host {parts.netloc!r}; a folder is written file:///absolute/path "
            "(three slashes)"
        )
    if parts.query:
        raise ValueError("must not have a ?query")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError(
            f"must name an absolute path, as in file:///srv/dicom, got {uri!r}"
        )
    if "\0" in path:
        raise ValueError("must not contain NUL")
    return Path(path)


def check_uri(uri: str) -> str | None:
    """A problem with a ``file:`` server URI for the config loader, or None."""
    try:
        folder_path(uri)
    except ValueError as e:
        return str(e)
    return None


# -- the index ---------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """What indexing keeps of one file."""

    path: str
    study: str
    series: str
    sop: str
    series_number: int | None
    instance_number: int | None


@dataclass(frozen=True)
class Index:
    """Study -> series -> SOP Instance UID -> path, each level in delivery order."""

    studies: Mapping[str, Mapping[str, Mapping[str, str]]]
    instances: int

    def lookup(self, target: Target) -> list[tuple[str, str]] | None:
        """(SOP Instance UID, path) of every instance under ``target``, or None."""
        series_map = self.studies.get(target.study)
        if series_map is None:
            return None
        if target.series is None:
            return [item for sops in series_map.values() for item in sops.items()]
        sops = series_map.get(target.series)
        if sops is None:
            return None
        if target.instance is None:
            return list(sops.items())
        path = sops.get(target.instance)
        if path is None:
            return None
        return [(target.instance, path)]


@dataclass(frozen=True)
class Built:
    index: Index
    #: path -> ((dev, ino, size, mtime_ns), Header or reason skipped)
    cache: dict
    #: (path, reason) to warn about: new or changed junk, unreadable folders, duplicates.
    warnings: list[tuple[str, str]]
    skipped: int


class _Closed(Exception):
    pass


def read_header(path: str) -> Header | str:
    """The indexed attributes of a Part 10 file, or why it is skipped."""
    try:
        with open(path, "rb") as f:
            head = f.read(_MAGIC_END)
            if len(head) < _MAGIC_END or head[128:] != b"DICM":
                return "not a DICOM Part 10 file (no 128-byte preamble and DICM magic)"
            f.seek(0)
            import pydicom  # here: only worker threads pay for the import

            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS.values()))
            except Exception as e:  # pydicom raises many kinds on bad input
                return f"unreadable DICOM header: {_short(e)}"
            sop_class = _raw(getattr(ds, "file_meta", {}), 0x00020002)
            if sop_class == _DICOMDIR_CLASS:
                return "a DICOMDIR (media directory), not an instance"
            values = {}
            for keyword, tag in _HEADER_TAGS.items():
                raw = _raw(ds, tag)
                if raw is _SHORT:
                    return f"truncated in {keyword}"
                values[keyword] = raw
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                value = values[keyword]
                if not value:
                    return f"has no {keyword} (truncated or not an instance)"
                if not is_uid(value):
                    return f"has an invalid {keyword} {value[:80]!r}"
            image = values["Rows"] is not None or _is_image_class(sop_class)
            truncated = _pixel_data_truncated(f, ds, os.fstat(f.fileno()).st_size, image)
            if truncated:
                return truncated
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    return Header(
        path=path,
        study=values["StudyInstanceUID"],
        series=values["SeriesInstanceUID"],
        sop=values["SOPInstanceUID"],
        series_number=_integer(values["SeriesNumber"]),
        instance_number=_integer(values["InstanceNumber"]),
    )


_SHORT = object()


def _is_image_class(sop_class) -> bool:
    """Objects of "... Image Storage" SOP classes always hold pixel data."""
    if not isinstance(sop_class, str) or not sop_class:
        return False
    from pydicom.uid import UID

    return "Image Storage" in UID(sop_class).name


def _raw(ds, tag: int):
    """
    An element's value as stripped text, None when absent, ``_SHORT`` when
    the file ends inside it. Raw bytes are decoded here so that pydicom's
    value validation does not warn about files we skip anyway.
    """
    if not hasattr(ds, "get_item") or tag not in ds:
        return None
    element = ds.get_item(tag)
    value = getattr(element, "value", None)
    if isinstance(value, bytes):
        length = getattr(element, "length", len(value))
        if length != 0xFFFFFFFF and len(value) < length:
            return _SHORT
        return value.decode("latin-1").strip("\0 ")
    return None if value is None else str(value).strip("\0 ")


def _pixel_data_truncated(f, ds, size: int, image: bool) -> str | None:
    """
    ``dcmread(stop_before_pixels=True)`` leaves ``f`` at the pixel data
    element, if any: check the file holds as many bytes as its header says.
    """
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    if syntax == _DEFLATED:
        return None  # pydicom read an inflated copy: offsets are not the file's
    pos = f.tell()
    if pos > size:  # pydicom seeks past the values it skips, even beyond the end
        return f"truncated: the header runs past the end of the file ({size} bytes)"
    if pos == size:
        if image:
            return f"truncated: an image without pixel data ({size} bytes)"
        return None
    element = f.read(12)
    if len(element) < 8:
        return "truncated in the pixel data element header"
    order = "big" if syntax == _EXPLICIT_BE else "little"
    group = int.from_bytes(element[0:2], order)
    if group != 0x7FE0:
        return None  # stopped at something else: nothing to check
    if syntax == _IMPLICIT_LE:
        header, length = 8, int.from_bytes(element[4:8], order)
    elif element[4:6] in _LONG_VRS:
        if len(element) < 12:
            return "truncated in the pixel data element header"
        header, length = 12, int.from_bytes(element[8:12], order)
    else:
        header, length = 8, int.from_bytes(element[6:8], order)
    if length == 0xFFFFFFFF:
        return None  # encapsulated, undefined length: not checked
    if pos + header + length > size:
        return f"truncated: pixel data needs {pos + header + length} bytes, the file has {size}"
    return None


def _integer(value: str | None) -> int | None:
    try:
        return None if not value else int(value.split("\\")[0])
    except ValueError:
        return None


def _short(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def build_index(root: Path, cache: dict, closed: threading.Event) -> Built:
    """
    Walk ``root`` and index every Part 10 file. Runs in a worker thread.
    Raises ``OSError`` when ``root`` itself cannot be listed.
    """
    if not root.is_dir():
        os.scandir(root).close()  # raises the precise OSError
        raise NotADirectoryError(20, "Not a directory", str(root))
    headers: list[Header] = []
    warnings: list[tuple[str, str]] = []
    new_cache: dict = {}
    skipped = 0

    def on_error(e: OSError) -> None:
        warnings.append((e.filename or str(root), f"folder cannot be read: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        if closed.is_set():
            raise _Closed()
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError as e:
                warnings.append((path, f"cannot be read: {e.strerror or e}"))
                skipped += 1
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # FIFOs, sockets, devices: never opened
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = cache.get(path)
            if cached is not None and cached[0] == key:
                result, fresh = cached[1], False
            else:
                result, fresh = read_header(path), True
            new_cache[path] = (key, result)
            if isinstance(result, str):
                skipped += 1
                if fresh:
                    warnings.append((path, result))
            else:
                headers.append(result)
    return Built(_arrange(headers, warnings), new_cache, warnings, skipped)


def _arrange(headers: list[Header], warnings: list[tuple[str, str]]) -> Index:
    seen: dict[str, str] = {}
    kept: list[Header] = []
    for header in sorted(headers, key=lambda h: h.path):
        first = seen.get(header.sop)
        if first is not None:
            warnings.append((header.path, f"holds instance {header.sop} again (first in {first}); ignored"))
            continue
        seen[header.sop] = header.path
        kept.append(header)
    by_series: dict[tuple[str, str], list[Header]] = {}
    for header in kept:
        by_series.setdefault((header.study, header.series), []).append(header)

    def number(value: int | None) -> tuple[bool, int]:
        return (value is None, value or 0)

    def series_order(item) -> tuple:
        (_, series), members = item
        numbers = [h.series_number for h in members if h.series_number is not None]
        return (number(min(numbers, default=None)), series)

    studies: dict[str, dict[str, Mapping[str, str]]] = {}
    for (study, series), members in sorted(by_series.items(), key=series_order):
        members.sort(key=lambda h: (number(h.instance_number), h.path))
        studies.setdefault(study, {})[series] = MappingProxyType({h.sop: h.path for h in members})
    return Index(
        MappingProxyType({k: MappingProxyType(v) for k, v in studies.items()}),
        len(kept),
    )


# -- reading files -----------------------------------------------------------


class _File:
    """One file read chunk by chunk from worker threads, closed exactly once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        self.closed = False

    def read(self, size: int) -> bytes:
        with self._lock:
            if self.closed:
                return b""
            if self._file is None:
                self._file = open(self.path, "rb")
            data = self._file.read(size)
            if not data:
                self._close()
            return data

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        self.closed = True
        if self._file is not None:
            file, self._file = self._file, None
            file.close()


@implementer(IRetrieval)
class FolderRetrieval(CoroutineRetrieval):
    """
    Streams the files under one target; at most one chunk is read ahead, and
    nothing is read or delivered while paused.
    """

    def __init__(self, source: FolderSource, target: Target, consumer: IInstanceConsumer) -> None:
        super().__init__()
        self._source = source
        self._target = target
        self._consumer = consumer
        self._start()

    async def _run(self) -> int:
        source = self._source
        index = await self._wait(source.ready())
        found = index.lookup(self._target)
        if found is None:
            raise NotFound(f"{self._target.describe()} not found at PACS server {source.server.key}")
        for sop, path in found:
            await self._send(sop, path)
        return len(found)

    async def _send(self, sop: str, path: str) -> None:
        source = self._source
        file = _File(path)
        started = False
        try:
            while True:
                await self._unpaused()
                try:
                    data = await self._wait(source.read(file))
                except OSError as e:
                    source.log.warn(
                        "PACS server {key}: cannot read {path} (instance {sop}): {error}",
                        key=source.server.key, path=path, sop=sop, error=str(e),
                    )
                    reason = e.strerror or type(e).__name__
                    raise UpstreamError(
                        f"PACS server {source.server.key} cannot read the file of instance "
                        f"{sop}: {reason}; it may have been moved or deleted since the folder "
                        "was indexed"
                    ) from None
                if not started:
                    if len(data) < _MAGIC_END or data[128:_MAGIC_END] != b"DICM":
                        source.log.warn(
                            "PACS server {key}: {path} (instance {sop}) is no longer a DICOM "
                            "Part 10 file",
                            key=source.server.key, path=path, sop=sop,
                        )
                        raise UpstreamError(
                            f"PACS server {source.server.key}: the file of instance {sop} is no "
                            "longer a DICOM Part 10 file; it changed since the folder was indexed"
                        )
                await self._unpaused()
                if not started:
                    started = True
                    self._consumer.instanceStarted()
                    self._check()
                if not data:
                    break
                self._consumer.instanceData(data)
                self._check()
            self._consumer.instanceEnded()
        finally:
            if not file.closed:
                source.close_file(file)


@implementer(IDicomSource)
class FolderSource:
    log = Logger()

    def __init__(self, server, reactor, chunk_size: int = CHUNK_SIZE) -> None:
        self.server = server
        self.clock = reactor
        self.chunk_size = chunk_size
        self._pool = reactor.getThreadPool()
        try:
            self.root: Path | None = folder_path(server.uri)
            self._problem: str | None = None
        except ValueError as e:
            self.root = None
            self._problem = f"PACS server {server.key}: uri {e}"
            self.log.error("{problem}", problem=self._problem)
        self._index: Index | None = None
        self._cache: dict = {}
        self._building = False
        self._current: list[Deferred] = []  # waiting for the build running now
        self._next: list[Deferred] = []  # waiting for a build that starts after now
        self._closed = threading.Event()

    # IDicomSource

    def retrieve(self, target: Target, consumer: IInstanceConsumer) -> IRetrieval:
        return FolderRetrieval(self, target, consumer)

    def close(self) -> Deferred[None]:
        self._closed.set()
        return succeed(None)

    # The index

    def refresh(self) -> Deferred[int]:
        """
        Rebuild the index from the folder. Fires with the number of instances
        indexed, or fails with ``UpstreamError`` (already logged) when the
        folder cannot be read, in which case the previous index stays.
        """
        d: Deferred[int] = Deferred()
        self._next.append(d)
        if not self._building:
            self._start()
        return d

    def ready(self) -> Deferred[Index]:
        """The current index, waiting for the first build (retrying a failed one)."""
        if self._index is not None:
            return succeed(self._index)
        d: Deferred = Deferred()
        if self._building:
            self._current.append(d)
        else:
            self._next.append(d)
            self._start()
        d.addCallback(lambda _: self._index)
        return d

    def _start(self) -> None:
        self._building = True
        self._current, self._next = self._next, []
        if self.root is None:
            self._built(Failure(UpstreamError(self._problem or "no folder")))
            return
        d = deferToThreadPool(
            self.clock, self._pool, build_index, self.root, self._cache, self._closed
        )
        d.addBoth(self._built)

    def _built(self, result) -> None:
        self._building = False
        waiters, self._current = self._current, []
        key = self.server.key
        if isinstance(result, Failure):
            if result.check(ProblemError):
                error = result.value
            elif result.check(_Closed):
                error = UpstreamError(f"PACS server {key} is closed")
            elif result.check(OSError):
                self.log.error(
                    "PACS server {key}: folder {root} cannot be read: {error}",
                    key=key, root=str(self.root), error=result.value.strerror or str(result.value),
                )
                error = UpstreamError(
                    f"PACS server {key}: its DICOM folder cannot be read "
                    f"({result.value.strerror or type(result.value).__name__})"
                )
            else:
                self.log.failure(
                    "PACS server {key}: indexing {root} failed", result, key=key, root=str(self.root)
                )
                error = UpstreamError(f"PACS server {key}: indexing its DICOM folder failed")
            for d in waiters:
                d.errback(error)
        else:
            built: Built = result
            for path, reason in built.warnings:
                self.log.warn(
                    "PACS server {key}: skipping {path}: {reason}", key=key, path=path, reason=reason
                )
            self._cache = built.cache
            self._index = built.index
            self.log.info(
                "PACS server {key}: indexed {root}: {instances} instances in {studies} "
                "studies, {skipped} files skipped",
                key=key, instances=built.index.instances, studies=len(built.index.studies),
                root=str(self.root), skipped=built.skipped,
            )
            for d in waiters:
                d.callback(built.index.instances)
        if self._next and not self._closed.is_set():
            self._start()
        elif self._next:
            pending, self._next = self._next, []
            for d in pending:
                d.errback(UpstreamError(f"PACS server {key} is closed"))

    # Files

    def read(self, file: _File) -> Deferred[bytes]:
        return deferToThreadPool(self.clock, self._pool, file.read, self.chunk_size)

    def close_file(self, file: _File) -> None:
        self._pool.callInThread(file.close)


@implementer(IPlugin, IDicomSourceFactory)
class Folder:
    name = "folder"
    schemes = ("file",)

    def open(self, server, reactor, auth) -> IDicomSource:
        """A folder source for ``server``; ``auth`` is ignored. Indexing starts now."""
        source = FolderSource(server, reactor)
        source.ready().addErrback(lambda _: None)  # logged in _built; retried on retrieve
        return source

    check_uri = staticmethod(check_uri)


folder = Folder()
