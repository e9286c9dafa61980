"""Tests for zhiva.multipart: framing, chunking independence, limits, linearity."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zhiva.multipart import MultipartError, MultipartParser, parse_content_type

BOUNDARY = b"3f8a1c2e-boundary"
Parts = list[tuple[dict[str, str], bytes]]


class Collector:
    """Records callbacks and checks their protocol (begin/data*/end, no empty data)."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict[str, str], bytearray]] = []
        self.open = False

    def begin(self, headers: dict[str, str]) -> None:
        assert not self.open
        self.parts.append((headers, bytearray()))
        self.open = True

    def data(self, chunk: bytes) -> None:
        assert self.open and chunk and type(chunk) is bytes
        self.parts[-1][1].extend(chunk)

    def end(self) -> None:
        assert self.open
        self.open = False

    def result(self) -> Parts:
        return [(h, bytes(d)) for h, d in self.parts]


def make_parser(collector: Collector, boundary: bytes = BOUNDARY, **kw) -> MultipartParser:
    return MultipartParser(boundary, collector.begin, collector.data, collector.end, **kw)


def parse(chunks, boundary: bytes = BOUNDARY, **kw) -> Parts:
    """Feed ``chunks`` (bytes or a list of bytes) and close; return the parts."""
    collector = Collector()
    parser = make_parser(collector, boundary, **kw)
    for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
        parser.feed(chunk)
    parser.close()
    assert not collector.open
    assert parser.parts == len(collector.parts)
    return collector.result()


def outcome(chunks, boundary: bytes = BOUNDARY, **kw) -> Parts | str:
    """The parts, or the MultipartError message: the two things a body can give."""
    try:
        return parse(chunks, boundary, **kw)
    except MultipartError as e:
        return f"error: {e}"


def body_of(parts: list[tuple[list[str], bytes]], boundary: bytes = BOUNDARY,
            preamble: bytes = b"", epilogue: bytes = b"\r\n") -> bytes:
    out = [preamble]
    for i, (header_lines, data) in enumerate(parts):
        out.append((b"\r\n" if i or preamble else b"") + b"--" + boundary + b"\r\n")
        out.append(b"".join(line.encode() + b"\r\n" for line in header_lines) + b"\r\n")
        out.append(data)
    out.append(b"\r\n--" + boundary + b"--" + epilogue)
    return b"".join(out)


def splits(body: bytes, cuts) -> list[bytes]:
    edges = [0, *sorted(cuts), len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:])]


DICOM_HEADERS = ["Content-Type: application/dicom", "Content-Length: {n}", "MIME-Version: 1.0"]


def orthanc_like(datas: list[bytes]) -> tuple[bytes, Parts]:
    """A WADO-RS answer shaped like Orthanc's, and the parts it must give."""
    parts = [([h.format(n=len(d)) for h in DICOM_HEADERS], d) for d in datas]
    expected = [({"content-type": "application/dicom", "content-length": str(len(d)),
                  "mime-version": "1.0"}, d) for d in datas]
    return body_of(parts), expected


SMALL_DATAS = [b"DICM\x00\x01\r\n\xff", b"", b"\r\n--3f8a1c2e-bound\r\n-\r"]


def test_orthanc_like_body_split_at_every_position():
    body, expected = orthanc_like(SMALL_DATAS)
    assert parse(body) == expected
    assert parse([body[i:i + 1] for i in range(len(body))]) == expected
    for i in range(len(body) + 1):
        assert parse(splits(body, [i])) == expected, i


def test_orthanc_like_body_split_at_every_pair_of_positions():
    body, expected = orthanc_like([b"ab\r\n", b"", b"\r\n--x"])
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1):
            assert parse(splits(body, [i, j])) == expected, (i, j)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datas=st.lists(st.binary(max_size=3000), min_size=1, max_size=4), data=st.data())
def test_random_parts_and_random_splits(datas, data):
    body, expected = orthanc_like(datas)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=30))
    assert parse(splits(body, cuts)) == expected


def test_random_big_body_random_chunk_sizes():
    rng = random.Random(7)
    datas = [rng.randbytes(rng.randrange(100_000, 300_000)) for _ in range(3)]
    datas[1] = datas[1].replace(b"\x00\x01", b"\r\n--" + BOUNDARY[:-1])  # many near misses
    body, expected = orthanc_like(datas)
    for max_chunk in (1 << 16, 1000, 17):
        cuts, at = [], 0
        while at < len(body):
            at += rng.randrange(1, max_chunk)
            cuts.append(min(at, len(body)))
        assert parse(splits(body, cuts)) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ('multipart/related; type="application/dicom"; boundary="abc:def"',
         ("multipart/related", {"type": "application/dicom", "boundary": "abc:def"})),
        ("multipart/related; boundary=abc", ("multipart/related", {"boundary": "abc"})),
        ('Multipart/Related; Type="application/dicom"; BOUNDARY=abc; transfer-syntax=*',
         ("multipart/related", {"type": "application/dicom", "boundary": "abc", "transfer-syntax": "*"})),
        ("multipart/related;boundary=abc:def;", ("multipart/related", {"boundary": "abc:def"})),
        ('multipart/related; boundary="a \\"q\\" b"', ("multipart/related", {"boundary": 'a "q" b'})),
        ("application/dicom", ("application/dicom", {})),
        ("", ("", {})),
    ],
)
def test_parse_content_type(value, expected):
    assert parse_content_type(value) == expected


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_parse_content_type_never_raises(value):
    media, params = parse_content_type(value)
    assert isinstance(media, str) and all(isinstance(v, str) for v in params.values())


def test_boundary_from_content_type_parses_body():
    for value, boundary in [('multipart/related; type="application/dicom"; boundary="abc:def"', b"abc:def"),
                            ("multipart/related; boundary=abc", b"abc")]:
        _, params = parse_content_type(value)
        assert params["boundary"].encode("latin-1") == boundary
        body = body_of([(["Content-Type: application/dicom"], b"payload")], boundary)
        assert parse(body, boundary) == [({"content-type": "application/dicom"}, b"payload")]


def test_preamble_and_epilogue_are_ignored():
    preamble = b"This is a preamble --3f8a1c2e-boundary not at a line start\r\n-- \r\n"
    epilogue = b"\r\nepilogue\r\n--" + BOUNDARY + b"\r\nX: y\r\n\r\nnot a part"
    body = body_of([([], b"one"), ([], b"two")], preamble=preamble, epilogue=epilogue)
    for chunks in (body, [body[i:i + 1] for i in range(len(body))]):
        assert parse(chunks) == [({}, b"one"), ({}, b"two")]


def test_first_delimiter_at_start_or_after_crlf():
    for prefix in (b"", b"\r\n", b"junk\r\n"):
        body = prefix + b"--b\r\n\r\nx\r\n--b--"
        assert parse(body, b"b") == [({}, b"x")]


def test_transport_padding_on_delimiter_lines():
    body = b"--b \t \r\nA: 1\r\n\r\none\r\n--b\t\r\n\r\ntwo\r\n--b--  \r\n"
    for i in range(len(body) + 1):
        assert parse(splits(body, [i]), b"b") == [({"a": "1"}, b"one"), ({}, b"two")]


def test_delimiter_like_lines_that_are_data():
    # Not delimiter lines: more boundary characters, or padding then something else.
    data = b"\r\n--bX\r\n--b \tX\r\n--b-x\r\n--b\rX\r\n-\r\n--\r"
    body = b"--b\r\n\r\n" + data + b"\r\n--b--"
    for i in range(len(body) + 1):
        assert parse(splits(body, [i]), b"b") == [({}, data)]


def test_near_boundary_data_passes_through_intact():
    boundary = b"boundary"
    data = b"\r\n--bound\r\n--boundar\r\r\n\r\n--\r\n-bound" * 50 + b"\r\n--boundar"
    body = body_of([([], data), ([], b"\r")], boundary)
    assert parse([body[i:i + 1] for i in range(len(body))], boundary) == [({}, data), ({}, b"\r")]
    assert parse(body, boundary) == [({}, data), ({}, b"\r")]


def test_data_is_delivered_promptly():
    collector = Collector()
    parser = make_parser(collector, b"b")
    parser.feed(b"--b\r\n\r\nhello")
    assert collector.result() == [({}, b"hello")]
    parser.feed(b" world\r\n--")  # might be a delimiter: held back
    assert collector.result() == [({}, b"hello world")]
    parser.feed(b"c")  # it is not
    assert collector.result() == [({}, b"hello world\r\n--c")]
    parser.feed(b"\r")
    parser.feed(b"\n--b--")
    parser.close()
    assert collector.result() == [({}, b"hello world\r\n--c")]


def test_part_without_headers():
    assert parse(b"--b\r\n\r\ndata\r\n--b--", b"b") == [({}, b"data")]
    assert parse(b"--b\r\n\r\n\r\n--b\r\n\r\n\r\n--b--", b"b") == [({}, b""), ({}, b"")]


def test_header_parsing():
    block = (b"Content-Type:  application/dicom \r\nX-Folded: a\r\n  b\r\n"
             b"X-Twice: 1\r\nx-twice: 2\r\nEmpty:\r\n")
    body = b"--b\r\n" + block + b"\r\nd\r\n--b--"
    assert parse(body, b"b") == [(
        {"content-type": "application/dicom", "x-folded": "a b", "x-twice": "1, 2", "empty": ""}, b"d")]


@pytest.mark.parametrize("line", [b"no colon here", b": no name", b"Bad Name: x", b" leading: fold"])
def test_malformed_header_line(line):
    body = b"--b\r\n" + line + b"\r\n\r\nd\r\n--b--"
    with pytest.raises(MultipartError, match="malformed part header line"):
        parse(body, b"b")


def test_header_cap():
    headers = b"X: " + b"v" * 47  # a 50-byte header block
    body = b"--b\r\n" + headers + b"\r\n\r\nd\r\n--b--"
    assert parse(body, b"b", max_header_bytes=50) == [({"x": "v" * 47}, b"d")]
    for chunks in (body, [body[i:i + 1] for i in range(len(body))]):
        with pytest.raises(MultipartError, match="part headers exceed 49 bytes"):
            parse(chunks, b"b", max_header_bytes=49)
    # Headers that never end fail as soon as the cap is passed, not at close().
    collector = Collector()
    parser = make_parser(collector, b"b", max_header_bytes=100)
    parser.feed(b"--b\r\nX: ")
    with pytest.raises(MultipartError, match="part headers exceed 100 bytes"):
        for _ in range(200):
            parser.feed(b"v")


def test_padding_cap():
    body = b"--b" + b" " * 60 + b"\r\n\r\nd\r\n--b--"
    assert parse(body, b"b", max_header_bytes=60) == [({}, b"d")]
    with pytest.raises(MultipartError, match="padding exceeds 59 bytes"):
        parse([body[i:i + 1] for i in range(len(body))], b"b", max_header_bytes=59)


@pytest.mark.parametrize("body", [
    b"--b\r\n\r\ndata",  # no close delimiter
    b"--b\r\n\r\ndata\r\n--b",  # delimiter without its line end
    b"--b\r\n\r\ndata\r\n--b-",
    b"--b\r\n\r\ndata\r\n--b\r\n",  # a part begun
    b"--b\r\nContent-Type: x\r\n",  # in headers
])
def test_missing_close_delimiter(body):
    collector = Collector()
    parser = make_parser(collector, b"b")
    parser.feed(body)
    with pytest.raises(MultipartError, match="without the close delimiter"):
        parser.close()
    with pytest.raises(MultipartError):
        parser.feed(b"\r\n--b--")


@pytest.mark.parametrize("body", [b"", b"no delimiter at all", b"--c\r\n\r\nx\r\n--c--", b" --b\r\n\r\nx\r\n", b"--bX\r\n\r\nx"])
def test_missing_first_boundary(body):
    with pytest.raises(MultipartError, match="without any multipart delimiter"):
        parse(body, b"b")


def test_close_delimiter_only_gives_no_parts():
    assert parse(b"--b--\r\n", b"b") == []


def test_boundary_length_and_characters():
    collector = Collector()
    make_parser(collector, b"x" * 70)
    make_parser(collector, b"x")
    for bad in (b"", b"x" * 71, b"a\r\nb", b"a\nb"):
        with pytest.raises(MultipartError):
            make_parser(collector, bad)


def test_callback_exceptions_propagate_and_kill_the_parser():
    class Stop(Exception):
        pass

    def data(chunk: bytes) -> None:
        raise Stop("consumer refused")

    parser = MultipartParser(b"b", lambda h: None, data, lambda: None)
    with pytest.raises(Stop, match="consumer refused"):
        parser.feed(b"--b\r\n\r\nxyz")
    with pytest.raises(MultipartError, match="consumer refused"):
        parser.feed(b"more")
    with pytest.raises(MultipartError):
        parser.close()


def test_errors_are_sticky():
    parser = make_parser(Collector(), b"b")
    with pytest.raises(MultipartError):
        parser.feed(b"--b\r\nbad header\r\n\r\n")
    with pytest.raises(MultipartError):
        parser.feed(b"x")


FRAGMENTS = [b"--b", b"--", b"-", b"\r\n", b"\r", b"\n", b" ", b"\t", b"A: 1", b"bad",
             b"\r\n\r\n", b"\r\n--b\r\n", b"\r\n--b--", b"x", b"\x00\xff"]


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=8), max_size=40), data=st.data())
def test_any_bytes_any_chunking_gives_parts_or_multipart_error(pieces, data):
    body = b"".join(pieces)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=12))
    whole = outcome(body, b"b", max_header_bytes=20)
    chunked = outcome(splits(body, cuts), b"b", max_header_bytes=20)
    assert whole == chunked  # the result never depends on the chunking


def test_buffer_stays_bounded_with_one_byte_feeds():
    """The linear-time guarantee, checked without timing.

    Each feed() costs O(len(data) + len(buffer)) (the buffer is all that is
    searched again), so a buffer bounded by the delimiter length plus the
    header cap makes the total linear in the body size even for 1-byte
    chunks. An O(n^2) rescan shows up here as a buffer growing with the part.
    """
    boundary = b"b" * 70
    cap = 1000
    rng = random.Random(1)
    near = b"\r\n--" + boundary[:40]
    data = b"".join(near if rng.random() < 0.01 else bytes([rng.randrange(256)]) for _ in range(1 << 20))
    body = body_of([(["Content-Type: application/dicom", "X: " + "v" * 900], data)], boundary)
    collector = Collector()
    parser = make_parser(collector, boundary, max_header_bytes=cap)
    bound = len(b"\r\n--" + boundary) + cap
    largest = 0
    for i in range(len(body)):
        parser.feed(body[i:i + 1])
        largest = max(largest, len(parser._buffer))
    parser.close()
    assert largest <= bound
    assert collector.result()[0][1] == data
