"""
The hot path of the "zhiva-json" wire protocol: bytes -> decimal JSON text.

Two implementations, byte-identical: the C extension ``_zhiva_decimal``
(``zhiva/_decimal.c``, built by setup.py when a compiler is present; ~1.9 GB/s
on one core, 34 us per 64 KiB network chunk, so it runs inline on the reactor
thread) and, without it, the numpy one below (~160-240 MB/s).

Each DICOM file travels as a JSON string holding a JSON array of its bytes as
decimal integers (``00 00 01 ff`` -> ``[0,0,1,255]``). A series is hundreds of
MB, so this must run at memory-ish speed, chunk by chunk, without Python-level
per-byte work.

How (numpy, no per-byte Python): every byte maps to a 4-byte word ``",ddd"``
zero-padded on the right, and lands at byte offset ``start[i]`` (a prefix sum
of the 2..4 byte lengths). Unaligned 4-byte stores are slow in numpy, so the
words go to four zeroed "planes", one per ``start % 4``, where every store is
an aligned ``uint32``; the planes are then OR-ed together, each shifted by its
residue. Valid bytes never overlap and padding is zero, so OR is exact. Work
is done in 64 Ki-byte blocks so that temporaries stay in cache, in scratch
arrays kept per thread: allocating fresh temporaries for every block costs
more than the encoding (page faults). That cache is invisible to callers; the
functions are pure.

numpy releases the GIL inside its loops, so the reactor keeps running while a
worker thread encodes (but two encoding threads scale poorly: the Python glue
between the ~20 numpy calls per block holds the GIL).
"""
from __future__ import annotations

import threading

import numpy as np

try:  # the optional C fast path (zhiva/_decimal.c, built by setup.py when a compiler exists)
    from _zhiva_decimal import encode as _c_encode
except ImportError:  # pragma: no cover - depends on the install
    _c_encode = None

__all__ = ["encode_chunk", "encode_instance"]

_BLOCK = 1 << 16  # input bytes per numpy pass: temporaries stay in L2/L3
_SLICE = 1 << 20  # input bytes per output buffer: bounds the per-thread cache
_SMALL = 160  # below this, numpy's per-call overhead loses to plain Python

_TEXT = [b"," + str(v).encode() for v in range(256)]
# ",d", ",dd" or ",ddd" as a little-endian uint32, zero-padded.
_WORD = np.array([int.from_bytes(t, "little") for t in _TEXT], dtype="<u4")
# The words of a byte pair, indexed by the pair read as little-endian uint16:
# one gather yields two words (fewer, wider gathers are faster).
_PAIR = (
    _WORD.astype("<u8")[None, :] | (_WORD.astype("<u8")[:, None] << np.uint64(32))
).ravel()


class _Scratch:
    """Per-thread work arrays, sized for one block."""

    def __init__(self) -> None:
        self.lens = np.empty(_BLOCK, np.uint8)
        self.big = np.empty(_BLOCK, np.uint8)
        self.start = np.zeros(_BLOCK + 1, np.intp)
        self.index = np.empty(_BLOCK, np.intp)
        self.words = np.empty(_BLOCK, "<u4")
        # total <= 4 * _BLOCK, so each plane needs at most _BLOCK + 1 words.
        self.planes = np.empty(4 * (_BLOCK + 1), "<u4")
        self.out = np.empty(4 * _SLICE, np.uint8)


_local = threading.local()


def _scratch() -> _Scratch:
    scratch = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = _Scratch()
    return scratch


def _encode_block(block: np.ndarray, out: np.ndarray, sc: _Scratch) -> int:
    """Write ``,d,d,...`` for ``block`` at the start of ``out``; return its length."""
    n = block.size
    lens = sc.lens[:n]
    big = sc.big[:n]
    np.greater(block, 9, out=lens.view(bool))
    np.greater(block, 99, out=big.view(bool))
    lens += big
    lens += 2  # "," plus 1..3 digits

    start = sc.start[: n + 1]  # start[0] stays 0
    np.cumsum(lens, dtype=np.intp, out=start[1:])
    total = int(start[n])
    start = start[:n]

    # Word i goes to plane start % 4, word index start // 4.
    m = (total >> 2) + 1
    index = sc.index[:n]
    np.bitwise_and(start, 3, out=index)
    index *= m
    np.right_shift(start, 2, out=start)
    index += start

    words = sc.words[:n]
    even = n & ~1
    _PAIR.take(block[:even].view("<u2"), out=words[:even].view("<u8"), mode="wrap")
    if even < n:
        words[even] = _WORD[block[even]]

    planes = sc.planes[: 4 * m]
    planes.fill(0)
    planes[index] = words

    lanes = planes.view(np.uint8).reshape(4, 4 * m)
    dest = out[:total]
    dest[:] = lanes[0, :total]
    for r in (1, 2, 3):
        np.bitwise_or(dest[r:], lanes[r, : total - r], out=dest[r:])
    return total


def _encode_slice(data: bytes | memoryview, sc: _Scratch) -> np.ndarray:
    """``,d,d,...`` for up to _SLICE bytes, as a view of the thread's scratch."""
    source = np.frombuffer(data, np.uint8)
    pos = 0
    for i in range(0, source.size, _BLOCK):
        pos += _encode_block(source[i : i + _BLOCK], sc.out[pos:], sc)
    return sc.out[:pos]


def _pieces(data: bytes, first: bool) -> list[bytes]:
    if len(data) < _SMALL:
        text = ",".join(map(str, data)).encode("ascii")
        return [text if first else b"," + text]
    sc = _scratch()
    view = memoryview(data)
    pieces = []
    for i in range(0, len(data), _SLICE):
        encoded = _encode_slice(view[i : i + _SLICE], sc)
        pieces.append(encoded[1:].tobytes() if first and i == 0 else encoded.tobytes())
    return pieces


def encode_chunk(chunk: bytes, first: bool) -> bytes:
    """
    The decimal text of ``chunk``'s bytes, comma separated, with a leading
    comma unless ``first``: so that ``b"[" + encode_chunk(c1, True) +
    encode_chunk(c2, False) + ... + b"]"`` is the compact JSON array of all
    the bytes for any split. Lets a whole instance stream chunk by chunk.
    """
    if not chunk:
        return b""
    if _c_encode is not None:
        return _c_encode(chunk, first)
    return _numpy_encode_chunk(chunk, first)


def _numpy_encode_chunk(chunk: bytes, first: bool) -> bytes:
    """``encode_chunk`` without the C extension (also what tests compare it to)."""
    if not chunk:
        return b""
    pieces = _pieces(chunk, first)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def encode_instance(data: bytes) -> bytes:
    """One instance as its JSON string literal: ``b'"[0,0,1,255]"'``.

    Digits, commas and brackets never need escaping, so the string literal is
    just the array text in quotes.
    """
    if not data:
        return b'"[]"'
    if _c_encode is not None:
        return b'"[' + _c_encode(data, True) + b']"'
    return b"".join([b'"[', *_pieces(data, True), b']"'])
