"""
Hostile input: property-based tests (bounded example counts) for UIDs,
data-filters, query strings and the multipart parser, and path tricks that
must be refused before any upstream call.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.web.http import parse_qs

from tests.support.proxy import make_certificate, start_proxy, write_config
from zhiva import config as configuration
from zhiva.errors import BadRequest, ProblemError
from zhiva.multipart import MultipartError, MultipartParser
from zhiva.relay import prepare
from zhiva.selection import INSTANCE, SERIES, STUDY, Route, Target, is_uid, parse_filters
from zhiva.web.app import _query

SERVER = "12121212-1212-4212-8212-121212121212"
MODEL = "34343434-3434-4343-8343-343434343434"
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _config(server_uri="http://127.0.0.1:9/dicom-web", model_uri="http://127.0.0.1:9/prediction"):
    directory = Path(tempfile.mkdtemp(prefix="zhiva-hostile-"))
    model = {
        "uri": model_uri,
        "task": "prediction",
        "supports": [STUDY, SERIES, INSTANCE],
        "dataFilter": [
            {"dataKey": "ct", "title": "CT", "dataFilter": [{"dataKey": "first", "title": "First"}]},
            {"dataKey": "pet", "title": "PET"},
        ],
    }
    write_config(directory, {SERVER: {"uri": server_uri, "isDefault": True}}, {MODEL: model})
    return configuration.load(directory)


CONFIG = _config()
ROUTES = [
    Route("predictions", MODEL, Target("1.2.3")),
    Route("predictions", MODEL, Target("1.2.3", "1.2.3.4")),
    Route("predictions", MODEL, Target("1.2.3", "1.2.3.4", "1.2.3.4.5")),
]

# UIDs

_REFERENCE = re.compile(r"(0|[0-9]+)(\.[0-9]+)*")
uids = st.lists(st.integers(0, 10**12).map(str), min_size=1, max_size=12).map(".".join)


@SETTINGS
@given(st.text(max_size=80) | st.text(alphabet="0123456789.", max_size=80))
def test_is_uid_matches_the_definition(text):
    expected = 1 <= len(text) <= 64 and _REFERENCE.fullmatch(text) is not None and text.isascii()
    assert is_uid(text) == expected


@SETTINGS
@given(uids)
def test_generated_uids_up_to_64_characters_are_accepted(uid):
    assert is_uid(uid) == (len(uid) <= 64)


# data-filters

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
filter_like = st.lists(
    st.fixed_dictionaries(
        {"dataKey": st.sampled_from(["ct", "pet", "first", "x", ""]) | st.text(max_size=5), "uuid": uids | st.text(max_size=8)},
        optional={"dataFilter": st.lists(st.fixed_dictionaries({"dataKey": st.sampled_from(["first", "ct"]), "uuid": uids}), max_size=2)},
    ),
    max_size=3,
)


@SETTINGS
@given(raw=json_values.map(json.dumps) | filter_like.map(json.dumps) | st.text(max_size=200), route=st.sampled_from(ROUTES))
def test_data_filters_parse_or_raise_bad_request(raw, route):
    model = CONFIG.models[MODEL]
    try:
        filters = parse_filters(raw, route, model)
    except BadRequest as e:
        assert e.detail and e.status == 400
        return
    for f in filters:  # what passes is valid: known keys, valid UIDs
        assert f.data_key in ("ct", "pet") and is_uid(f.uid)
        for n in f.nested:
            assert n.data_key == "first" and is_uid(n.uid)


@pytest.mark.parametrize("raw", ["[" * 30000 + "]" * 30000, '{"a":' * 20000 + "1" + "}" * 20000])
def test_deeply_nested_data_filters_are_a_bad_request(raw):
    with pytest.raises(BadRequest):
        parse_filters(raw, ROUTES[0], CONFIG.models[MODEL])


# Query strings: Twisted's parsing, then ours, then every local check


@SETTINGS
@given(query=st.binary(max_size=300) | st.lists(
    st.tuples(st.sampled_from([b"server", b"data-filters", b"x"]), st.binary(max_size=40)), max_size=4
).map(lambda pairs: b"&".join(k + b"=" + v for k, v in pairs)), route=st.sampled_from(ROUTES))
def test_any_query_string_is_a_job_or_a_problem(query, route):
    request = SimpleNamespace(args=parse_qs(query, keep_blank_values=True))
    try:
        job = prepare(CONFIG, route, _query(request, b"server"), _query(request, b"data-filters"))
    except ProblemError as e:
        assert 400 <= e.status < 500 and e.detail
        return
    assert job.server.key == SERVER  # only configured URIs and validated UIDs make the URL
    for fetch in job.plan.fetches:
        assert all(part is None or is_uid(part) for part in (fetch.target.study, fetch.target.series, fetch.target.instance))


# The multipart parser: parts or our own error, for any bytes cut anywhere

BOUNDARY = b"b0undary"
pieces = st.lists(
    st.sampled_from([b"--b0undary\r\n", b"\r\n--b0undary\r\n", b"\r\n--b0undary--", b"\r\n\r\n",
                     b"Content-Type: application/dicom\r\n", b"\r\n", b"--", b"b0und", b"x" * 100]) | st.binary(max_size=50),
    max_size=30,
)


MAX_HEADER = 512
#: What the parser may hold between feeds: part headers (or delimiter-line
#: padding) up to the cap, the delimiter "\r\n--b0undary" and a CRLF or two.
HELD_AT_MOST = MAX_HEADER + len(b"\r\n--" + BOUNDARY) + 5


@SETTINGS
@given(body=pieces.map(b"".join), cuts=st.lists(st.integers(0, 2000), max_size=6) | st.just("bytewise"))
def test_multipart_parser_yields_parts_or_raises_multipart_error(body, cuts):
    """Parts or MultipartError; never more held than the header cap allows, however it is cut."""
    events = []
    size = [0]

    def data(chunk):
        size[0] += len(chunk)
        events.append("data")

    parser = MultipartParser(BOUNDARY, lambda h: events.append("begin"), data, lambda: events.append("end"),
                             max_header_bytes=MAX_HEADER)
    if cuts == "bytewise":  # the worst case for anything that rescans or accumulates
        bounds = list(range(len(body) + 1))
    else:
        bounds = sorted({0, len(body), *(c for c in cuts if c < len(body))})
    try:
        for start, end in zip(bounds, bounds[1:]):
            parser.feed(body[start:end])
            assert parser.buffered <= HELD_AT_MOST
        parser.close()
    except MultipartError:
        return
    assert events.count("begin") == events.count("end") == parser.parts
    assert size[0] <= len(body)


@pytest.mark.parametrize(
    "opener, filler",
    [
        (b"", b"x" * 4096),
        (b"--b0undary\r\n\r\n", b"\r\n--b0undar" * 400),
        (b"--b0undary", b" " * 4096),
        (b"--b0undary\r\nX-A: ", b"a" * 4096),
    ],
    ids=["preamble", "near-delimiters-in-a-part", "delimiter-padding", "part-headers"],
)
def test_multipart_parser_memory_stays_bounded_on_endless_input(opener, filler):
    """
    Megabytes that never complete a part (a PACS streaming garbage): after
    every feed the parser holds no more than the header cap allows, and it
    either passes the bytes on (preamble, part data) or refuses at the cap.
    """
    parser = MultipartParser(BOUNDARY, lambda h: None, lambda d: None, lambda: None, max_header_bytes=MAX_HEADER)
    parser.feed(opener)
    try:
        for _ in range((4 << 20) // len(filler)):
            parser.feed(filler)
            assert parser.buffered <= HELD_AT_MOST
    except MultipartError as e:
        assert "exceed" in str(e) and f"{MAX_HEADER} bytes" in str(e)


# Path tricks, end to end: refused before any upstream call


@pytest.fixture(scope="module")
def trick_proxy(tmp_path_factory, orthanc, model_server):
    directory = tmp_path_factory.mktemp("config")
    model = {"uri": model_server.url + "/prediction", "task": "prediction", "supports": [STUDY, SERIES, INSTANCE]}
    write_config(directory, {SERVER: {"uri": orthanc.dicomweb, "isDefault": True}}, {MODEL: model})
    running = start_proxy(reactor, directory, *make_certificate(tmp_path_factory.mktemp("tls")))
    yield running
    pytest_twisted.blockon(ensureDeferred(running.stop()))


P = f"/predictions/{MODEL}/studies"
PATH_TRICKS = [
    (f"{P}/%2e%2e", 400, "'..'"),
    (f"{P}/%2E%2E/series/1.2", 400, "'..'"),
    (f"{P}/1.2%2F..%2F..%2Fadmin", 400, "1.2/../../admin"),
    (f"{P}/1.2/series/%2e%2e%2f%2e%2e%2fstudies", 400, "../../studies"),
    (f"{P}/1.2/series/1.3%5C..", 400, "not a valid DICOM UID"),
    (f"{P}/1.2%00", 400, "not a valid DICOM UID"),
    (f"{P}/1.2%00.3/series/1.4", 400, "not a valid DICOM UID"),
    (f"{P}/1.2;x=1", 400, "not a valid DICOM UID"),
    (f"{P}/1.2/series/" + "1" * 3000, 400, "not a valid DICOM UID"),
    (f"{P}/1.2/series/1.3/instances/" + "1." * 40 + "1", 400, "not a valid DICOM UID"),
    ("/predictions/%2e%2e/studies/1.2", 404, "no model"),
    (f"/predictions/{MODEL}%00/studies/1.2", 404, "no model"),
    ("/predictions/" + "a" * 4000 + "/studies/1.2", 404, "no model"),
    (f"/predictions/{MODEL}//studies/1.2", 404, "no such resource"),
    (f"/predictions//{MODEL}/studies/1.2", 404, "no such resource"),
    (f"//predictions/{MODEL}/studies/1.2", 404, ""),
    (f"/predictions/{MODEL}/studies//1.2", 404, "no such resource"),
    (f"/predictions/{MODEL}/%73tudies/1.2%2Fseries%2F1.3", 400, "not a valid DICOM UID"),
    (f"{P}/1.2/series/1.3/instances/1.4/..%2f..%2f..", 404, ""),
    (f"{P}/1.2?server=..%2F..%2F", 404, "no server"),
    (f"{P}/1.2?server={SERVER}&server={SERVER}", 400, "given 2 times"),
]


@pytest.mark.parametrize("path, status, words", PATH_TRICKS, ids=range(len(PATH_TRICKS)))
@pytest_twisted.ensureDeferred
async def test_path_tricks_are_refused_before_any_upstream_call(trick_proxy, model_server, path, status, words):
    before = model_server.last()
    response = await trick_proxy.client.get(trick_proxy.url.encode() + path.encode())
    body = await response.content()
    assert response.code == status, body[:300]
    assert response.headers.getRawHeaders("content-type") == ["application/problem+json"]
    assert words in json.loads(body)["detail"]
    assert model_server.last() == before
