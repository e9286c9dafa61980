"""
The cache's files on disk: their names, their layout, and the blocking code
that reads, writes and scans them. Everything here runs in the cache's
worker threads, never on the reactor.

- One file per retrieve target, named by a hash of the server (its key,
  ``uri``, ``authType`` and ``login``: never a secret) and the UIDs. Another
  server, or the same key pointed at another PACS, never answers from it.
- A file is the instances back to back, a JSON footer listing their sizes,
  the footer's length and a magic number. A file whose footer does not add
  up (truncated, foreign) is never served.
- A fill writes under a temporary name (``.fill-*``) and renames it into
  place only after the file was synced, so an unfinished fill is never
  visible; ``scan`` deletes what a crash left.
- Files are 0600 in a 0700 directory: they hold patient data.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from pathlib import Path

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

SUFFIX = ".dcmc"
PARTIAL_PREFIX = ".fill-"
MAGIC = b"ZHIVAC01"
_TRAILER = struct.Struct(">Q8s")  # footer length, magic
_MAGIC_END = 132  # Part 10: 128-byte preamble, then "DICM"
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def entry_name(server, target) -> str:
    """The file name (without suffix) of ``target`` at ``server``."""
    identity = [
        server.key, server.uri, server.auth_type, server.login or "",
        target.study, target.series, target.instance,
    ]
    return hashlib.sha256(json.dumps(identity).encode("utf-8")).hexdigest()


class Invalid(Exception):
    """A cache file that must not be served."""


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
    At start: the valid entries as (name, size, mtime, atime), and how many
    partial and invalid files were deleted.
    """
    entries, partial, invalid = [], 0, 0
    with os.scandir(directory) as items:
        for item in items:
            if item.name.startswith(PARTIAL_PREFIX):
                unlink(item.path)
                partial += 1
                continue
            if not item.name.endswith(SUFFIX) or not item.is_file(follow_symlinks=False):
                continue
            try:
                with open(item.path, "rb") as f:
                    st = os.fstat(f.fileno())
                    read_footer(f, st.st_size)
            except (OSError, Invalid):
                unlink(item.path)
                invalid += 1
                continue
            entries.append((item.name[: -len(SUFFIX)], st.st_size, st.st_mtime, st.st_atime))
    return entries, partial, invalid


def unlink(path) -> None:
    """Delete ``path``; already gone is fine."""
    Path(path).unlink(missing_ok=True)


def sync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable; best effort (not every file system allows it)."""
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


def reason(failure: Failure) -> str:
    """What went wrong in a disk call, for the log."""
    value = failure.value
    return getattr(value, "strerror", None) or str(value) or type(value).__name__


class Reader:
    """An entry file read one chunk at a time from worker threads; closed exactly once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        self._closed = False

    def open(self) -> list[int]:
        """Check the whole layout before anything is served; mark the file used (atime: LRU order)."""
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


class Writer:
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
        sync_directory(final.parent)
        return size

    def abort(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        unlink(self.path)
