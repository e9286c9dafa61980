"""
Streaming ``multipart/related`` parser (RFC 2046 §5.1), as WADO-RS answers.

Built for series of hundreds of MB arriving in network-sized chunks:

- Linear time whatever the chunking. Between feeds the parser keeps only a
  tail that may be the start of a delimiter (shorter than the delimiter), or
  the part headers / delimiter-line padding read so far (both capped). It
  never searches the same bytes twice, unlike rescanning the whole buffer per
  chunk (the O(n²) of dicomweb-client issue #127).
- Bounded memory: part data goes to ``on_part_data`` as soon as it cannot be
  the start of a delimiter; it is never accumulated.

No Twisted here: the caller feeds bytes and maps ``MultipartError``.
"""
from __future__ import annotations

import email.message
import email.utils
import re
from typing import Callable

__all__ = ["MultipartError", "MultipartParser", "parse_content_type"]


class MultipartError(ValueError):
    """The body is not valid multipart; the message says what is wrong."""


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """
    Split a Content-Type value into its lowercased media type and parameters
    (names lowercased, quoted values unquoted, RFC 2231 values decoded).

    Uses the stdlib's lenient MIME parser: servers send unquoted ``:`` in
    boundaries and ``transfer-syntax=*``, which a strict RFC parser rejects.
    Never raises: a value without a media type gives ``""``.
    """
    message = email.message.Message()
    message["content-type"] = value
    found = message.get_params(header="content-type") or [("", "")]
    media = found[0][0].strip().lower()
    params: dict[str, str] = {}
    for name, raw in found[1:]:
        name = name.strip().lower()
        if name and name not in params:  # a repeated parameter must not override
            params[name] = email.utils.collapse_rfc2231_value(raw)
    return media, params


# States.
_PREAMBLE = "preamble"  # before the first delimiter
_BODY = "body"  # in a part's data
_DELIMITER = "delimiter"  # buffer starts with "\r\n--boundary": what follows?
_HEADERS = "headers"  # buffer starts with the CRLF ending a delimiter line
_DONE = "done"  # after the close delimiter

_PADDING = re.compile(rb"[ \t]*")
_CR, _LF, _DASH = 0x0D, 0x0A, 0x2D


class MultipartParser:
    """
    Push parser: ``feed`` body chunks, then ``close`` at end of body.

    Calls ``on_part_begin(headers)`` (names lowercased, values stripped),
    ``on_part_data(chunk)`` any number of times (never empty), then
    ``on_part_end()`` for each part. Exceptions from callbacks propagate
    unchanged; after any error the parser is dead and raises MultipartError.
    """

    def __init__(
        self,
        boundary: bytes,
        on_part_begin: Callable[[dict[str, str]], None],
        on_part_data: Callable[[bytes], None],
        on_part_end: Callable[[], None],
        *,
        max_header_bytes: int = 16384,
    ) -> None:
        if not 1 <= len(boundary) <= 70:
            raise MultipartError(f"boundary must be 1 to 70 characters, not {len(boundary)}")
        if b"\r" in boundary or b"\n" in boundary:
            # Also what makes the tail logic of _safe_end correct.
            raise MultipartError("boundary must not contain CR or LF")
        self._delimiter = b"\r\n--" + bytes(boundary)
        self._on_begin = on_part_begin
        self._on_data = on_part_data
        self._on_end = on_part_end
        self._max_header = max_header_bytes
        # A virtual CRLF lets a delimiter at the very start of the body match.
        self._buffer = bytearray(b"\r\n")
        self._state = _PREAMBLE
        self._in_part = False
        self._scan = 0  # where the search resumes in the buffer (headers, padding)
        self._failed: str | None = None
        self.parts = 0

    @property
    def buffered(self) -> int:
        """
        Bytes held between feeds: less than ``max_header_bytes`` plus the
        delimiter and a CRLF or two, whatever the input (the bound the tests
        check, so that no body makes the parser hoard memory).
        """
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        if self._failed is not None:
            raise MultipartError(f"parser failed earlier: {self._failed}")
        if self._state is _DONE or not data:
            return  # the epilogue is ignored, not buffered
        try:
            if self._buffer:
                self._buffer += data
                buf: bytes | bytearray = self._buffer
            else:  # common case for large chunks: no copy into the buffer
                buf = bytes(data)
            consumed = self._run(buf)
            if buf is self._buffer:
                del buf[:consumed]
            elif self._state is not _DONE:
                self._buffer = bytearray(buf[consumed:])
            self._scan -= consumed
        except BaseException as e:
            self._fail(str(e) or type(e).__name__)
            raise

    def close(self) -> None:
        if self._failed is not None:
            raise MultipartError(f"parser failed earlier: {self._failed}")
        if self._state is _DONE:
            return
        if self._state is _PREAMBLE:
            message = "body ended without any multipart delimiter"
        else:
            message = "body ended inside a part, without the close delimiter"
        self._fail(message)
        raise MultipartError(message)

    def _fail(self, reason: str) -> None:
        self._failed = reason
        self._buffer = bytearray()

    def _run(self, buf: bytes | bytearray) -> int:
        """Process ``buf`` as far as possible; return how many bytes are done with."""
        pos = 0  # everything before pos is consumed
        search = 0  # a delimiter cannot start before this (body and preamble)
        while True:
            state = self._state
            if state is _BODY or state is _PREAMBLE:
                found = buf.find(self._delimiter, max(pos, search))
                end = found if found >= 0 else self._safe_end(buf, max(pos, search))
                if state is _BODY and end > pos:
                    self._on_data(_slice(buf, pos, end))
                pos = end
                if found < 0:
                    return pos
                self._state = _DELIMITER
                self._scan = pos + len(self._delimiter)
            elif state is _DELIMITER:
                kind, end = self._after_boundary(buf, pos)
                if kind == "more":
                    return pos
                if kind == "not":  # e.g. "--boundaryX": ordinary bytes
                    self._state = _BODY if self._in_part else _PREAMBLE
                    search = pos + 1
                    continue
                if self._in_part:
                    self._in_part = False
                    self.parts += 1
                    self._on_end()
                if kind == "close":
                    self._state = _DONE
                    return len(buf)
                self._state = _HEADERS
                pos = end - 2  # keep the CRLF: "\r\n\r\n" then ends even no headers
                self._scan = pos
            elif state is _HEADERS:
                found = buf.find(b"\r\n\r\n", self._scan)
                size = (found if found >= 0 else len(buf) - 3) - (pos + 2)
                if size > self._max_header:
                    raise MultipartError(f"part headers exceed {self._max_header} bytes")
                if found < 0:
                    self._scan = max(pos, len(buf) - 3)
                    return pos
                headers = _parse_headers(bytes(buf[pos + 2 : found]))
                pos = search = found + 4
                self._state = _BODY
                self._in_part = True
                self._on_begin(headers)
            else:  # _DONE: feed() returns early, so only a defensive stop
                return len(buf)

    def _safe_end(self, buf: bytes | bytearray, start: int) -> int:
        """End of the bytes from ``start`` that cannot begin a delimiter.

        A delimiter holds no CR but its first byte, so only the last CR can
        start a partial one, and only if fewer than len(delimiter) bytes follow.
        """
        last = buf.rfind(b"\r", max(start, len(buf) - len(self._delimiter) + 1))
        if last >= 0 and self._delimiter.startswith(buf[last:]):
            return last
        return len(buf)

    def _after_boundary(self, buf: bytes | bytearray, pos: int) -> tuple[str, int]:
        """Classify what follows the "\\r\\n--boundary" found at ``pos``.

        Returns ("open", end of the delimiter line), ("close", 0), ("not", 0)
        when this is no delimiter line after all (e.g. "--boundaryX"), or
        ("more", 0) when more bytes are needed to tell.
        """
        start = pos + len(self._delimiter)
        n = len(buf)
        if start >= n:
            return "more", 0
        if buf[start] == _DASH:
            if start + 1 >= n:
                return "more", 0
            return ("close", 0) if buf[start + 1] == _DASH else ("not", 0)
        at = self._scan = _PADDING.match(buf, self._scan).end()  # padding: scanned once
        if at - start > self._max_header:
            raise MultipartError(f"delimiter line padding exceeds {self._max_header} bytes")
        if at >= n:
            return "more", 0
        if buf[at] != _CR:
            return "not", 0
        if at + 1 >= n:
            return "more", 0
        return ("open", at + 2) if buf[at + 1] == _LF else ("not", 0)


def _slice(buf: bytes | bytearray, start: int, end: int) -> bytes:
    """``bytes(buf[start:end])`` with a single copy."""
    if isinstance(buf, bytes):
        return buf[start:end]
    with memoryview(buf) as view:
        return view[start:end].tobytes()


def _parse_headers(block: bytes) -> dict[str, str]:
    """MIME part headers; folded lines are unfolded, repeats joined with ", "."""
    headers: dict[str, str] = {}
    name = ""
    for line in block.split(b"\r\n") if block else ():
        if line[:1] in (b" ", b"\t") and name:
            headers[name] = f"{headers[name]} {line.strip().decode('latin-1')}".strip()
            continue
        raw_name, colon, raw_value = line.partition(b":")
        name = raw_name.rstrip().decode("latin-1").lower()
        if not colon or not name or any(c in name for c in " \t"):
            raise MultipartError(f"malformed part header line {line[:80]!r}")
        value = raw_value.strip().decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers
