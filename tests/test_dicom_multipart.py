"""
The ``dicom-multipart`` model protocol: the body is a STOW-RS body carrying
each instance byte for byte, data filters ride in a leading JSON part, a slow
model holds the PACS back, and it works end to end through the proxy against
the test model API and the example model of ``examples/``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from examples.dicom_multipart_model import read_request, split_multipart, to_uids
from tests.support.proxy import make_certificate, start_proxy, write_config
from tests.test_body import SERIES_A, SERIES_B, STUDY_UID, FakeSource, SlowModel, _files
from zhiva import registry
from zhiva.body import PlanBody
from zhiva.multipart import MultipartParser, parse_content_type
from zhiva.plugins.dicom_multipart import DicomMultipartEncoder, protocol
from zhiva.selection import Filter, Route, Target, plan

ROOT = Path(__file__).resolve().parent.parent
SERVER = "11111111-1111-4111-8111-111111111111"
PLAIN = "bbbbbbbb-0000-4000-8000-000000000001"
STUDY_FILTER = "bbbbbbbb-0000-4000-8000-000000000002"
SERIES_FILTER = "bbbbbbbb-0000-4000-8000-000000000003"
EXAMPLE = "bbbbbbbb-0000-4000-8000-000000000004"
EXAMPLE_FILTER = "bbbbbbbb-0000-4000-8000-000000000005"
ALL_LEVELS = ["/studies", "/studies/series", "/studies/series/instances"]
STUDY_INPUTS = [
    {"dataKey": "ct", "title": "CT series"},
    {
        "dataKey": "pair",
        "title": "Two slices",
        "dataFilter": [{"dataKey": "first", "title": "First"}, {"dataKey": "second", "title": "Second"}],
    },
]
SERIES_INPUTS = [{"dataKey": "first", "title": "First"}, {"dataKey": "last", "title": "Last"}]


def parse(content_type: bytes, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of ``body`` as our WADO-RS parser sees them."""
    media, params = parse_content_type(content_type.decode())
    assert media == "multipart/related" and params["type"] == "application/dicom"
    parts: list = []
    parser = MultipartParser(
        params["boundary"].encode(),
        lambda h: parts.append((h, [])),
        lambda d: parts[-1][1].append(d),
        lambda: None,
    )
    parser.feed(body)
    parser.close()
    return [(h, b"".join(c)) for h, c in parts]


def _run(route, filters, files, window=1 << 30):
    the_plan = plan(route, filters)
    source = FakeSource(files)
    encoder = protocol.encoder(the_plan)
    body = PlanBody(the_plan, encoder, source)
    body.prime()
    source.run()
    model = SlowModel(window)
    model.producer = body
    finished = body.startProducing(model)
    rounds = 0
    while not finished.called:
        source.run()
        model.read_all()
        rounds += 1
    return encoder, model, rounds


def test_the_protocol_is_a_registered_plugin():
    assert registry.protocols()["dicom-multipart"] is protocol
    assert "zhiva-json" in registry.protocols()


def test_without_filters_the_body_is_a_plain_stow_body_of_the_exact_files():
    files = _files(3, 2500)
    route = Route("predictions", "m", Target(STUDY_UID, SERIES_A))
    encoder, model, _ = _run(route, (), {Target(STUDY_UID, SERIES_A): files})

    parts = parse(encoder.contentType, model.body())
    assert [content for _, content in parts] == files
    assert [h["content-type"] for h, _ in parts] == ["application/dicom"] * 3
    assert [h["content-id"] for h, _ in parts] == [f"<f0.i{i}@zhiva>" for i in range(3)]
    # The example model's stdlib parser agrees, byte for byte.
    boundary = parse_content_type(encoder.contentType.decode())[1]["boundary"].encode()
    assert [c for _, c in split_multipart(model.body(), boundary)] == files


def test_each_request_has_its_own_boundary():
    the_plan = plan(Route("predictions", "m", Target(STUDY_UID)), ())
    assert protocol.encoder(the_plan).boundary != protocol.encoder(the_plan).boundary


def test_study_filters_travel_in_a_leading_json_part():
    a, b = _files(2, 1500, 1), _files(1, 700, 2)
    route = Route("predictions", "m", Target(STUDY_UID))
    filters = (Filter("ct", SERIES_A), Filter("pair", SERIES_B, (Filter("only", "1.2.3.2.1"),)))
    files = {Target(STUDY_UID, SERIES_A): a, Target(STUDY_UID, SERIES_B, "1.2.3.2.1"): b}
    encoder, model, _ = _run(route, filters, files)

    (head, text), *dicom = parse(encoder.contentType, model.body())
    assert head["content-type"] == "application/json"
    assert json.loads(text) == {
        "zhiva": "dicom-multipart/1",
        "fetches": [
            {"study": STUDY_UID, "series": SERIES_A, "instance": None, "single": False},
            {"study": STUDY_UID, "series": SERIES_B, "instance": "1.2.3.2.1", "single": True},
        ],
        "data": {"ct": {"data": {"fetch": 0}}, "pair": {"data": {"only": {"data": {"fetch": 1}}}}},
    }
    assert [(h["content-id"], c) for h, c in dicom] == [
        ("<f0.i0@zhiva>", a[0]),
        ("<f0.i1@zhiva>", a[1]),
        ("<f1.i0@zhiva>", b[0]),
    ]


def test_a_slow_model_pauses_the_pacs_instead_of_buffering():
    files = _files(20, 50_000)
    window = 8192
    route = Route("predictions", "m", Target(STUDY_UID, SERIES_A))
    encoder, model, rounds = _run(route, (), {Target(STUDY_UID, SERIES_A): files}, window)

    # Bytes buffered, not time: never more than the window, one PACS chunk and a part header.
    assert model.max_unread < window + 1000 + 200
    assert rounds > sum(map(len, files)) // (window + 1200)
    assert [c for _, c in parse(encoder.contentType, model.body())] == files


def test_explicit_boundary_and_close_delimiter():
    the_plan = plan(Route("predictions", "m", Target(STUDY_UID, SERIES_A)), ())
    encoder = DicomMultipartEncoder(the_plan, boundary=b"B")
    body = (
        encoder.begin() + encoder.beginFetch(0) + encoder.beginInstance(0)
        + encoder.instanceData(b"DICM") + encoder.endInstance() + encoder.endFetch() + encoder.end()
    )
    assert encoder.contentType == b'multipart/related; type="application/dicom"; boundary=B'
    assert body == b"--B\r\nContent-Type: application/dicom\r\nContent-ID: <f0.i0@zhiva>\r\n\r\nDICM\r\n--B--\r\n"


# End to end: viewer -> proxy -> Orthanc -> proxy -> model (dicom-multipart).


@pytest.fixture(scope="module")
def example_model(tmp_path_factory):
    """``examples/dicom_multipart_model.py`` in its own process."""
    portfile = tmp_path_factory.mktemp("example") / "port"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "dicom_multipart_model.py"), "--port", "0",
         "--portfile", str(portfile)],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not portfile.exists():
            assert process.poll() is None and time.monotonic() < deadline, "example model did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{int(portfile.read_text())}"
    finally:
        process.terminate()
        process.wait(10)


def example_last(url: str):
    with urllib.request.urlopen(url + "/last", timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def multipart_proxy_config(tmp_path_factory, orthanc, model_server, example_model):
    def model(uri, **extra):
        return {"uri": uri, "task": "prediction", "supports": ALL_LEVELS,
                "protocol": "dicom-multipart", **extra}

    models = {
        PLAIN: model(model_server.url + "/prediction"),
        STUDY_FILTER: model(model_server.url + "/prediction", dataFilter=STUDY_INPUTS),
        SERIES_FILTER: model(model_server.url + "/prediction", dataFilter=SERIES_INPUTS),
        EXAMPLE: model(example_model + "/prediction"),
        EXAMPLE_FILTER: model(example_model + "/prediction", dataFilter=STUDY_INPUTS),
    }
    servers = {SERVER: {"uri": orthanc.dicomweb, "isDefault": True}}
    return write_config(tmp_path_factory.mktemp("config"), servers, models)


@pytest.fixture
def proxy(multipart_proxy_config, tmp_path_factory):
    cert = make_certificate(tmp_path_factory.mktemp("tls"))
    running = start_proxy(reactor, multipart_proxy_config, *cert)
    yield running
    pytest_twisted.blockon(ensureDeferred(running.stop()))


def _path(model: str, study, series=None, sop=None) -> str:
    path = f"/predictions/{model}/studies/{study.study_uid}"
    if series:
        path += f"/series/{series}"
    if sop:
        path += f"/instances/{sop}"
    return path


@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest_twisted.ensureDeferred
async def test_every_level_reaches_the_model_as_dicom_multipart(proxy, study, model_server, level):
    small = study.small_series_uid
    sops = study.series[small]
    series = small if level != "/studies" else None
    sop = sops[1] if level.endswith("instances") else None

    response, result = await proxy.get_json(_path(PLAIN, study, series, sop))

    assert response.code == 200, result
    received = model_server.last()
    assert received["error"] is None
    assert received["content_type"].startswith('multipart/related; type="application/dicom"; boundary=')
    expected = [sops[1]] if sop else (sops if series else study.all_sops())
    assert sorted(received["keys"]) == sorted(expected)
    assert study.study_uid in result


@pytest_twisted.ensureDeferred
async def test_a_big_series_arrives_whole(proxy, study, model_server):
    big = study.big_series_uid

    response, result = await proxy.get_json(_path(PLAIN, study, big))

    assert response.code == 200, result
    received = model_server.last()
    assert received["keys"] == study.series[big]
    assert received["body_bytes"] > sum(p.stat().st_size for p in study.series_files(big))


@pytest_twisted.ensureDeferred
async def test_study_level_data_filters(proxy, study, model_server):
    small = study.small_series_uid
    sops = study.series[small]
    filters = [
        {"dataKey": "ct", "uuid": small},
        {"dataKey": "pair", "uuid": small,
         "dataFilter": [{"dataKey": "first", "uuid": sops[0]}, {"dataKey": "second", "uuid": sops[2]}]},
    ]

    response, result = await proxy.get_json(
        _path(STUDY_FILTER, study), params={"data-filters": json.dumps(filters)}
    )

    assert response.code == 200, result
    assert model_server.last()["keys"] == {
        "ct": {"data": sops},
        "pair": {"data": {"first": {"data": sops[0]}, "second": {"data": sops[2]}}},
    }


@pytest_twisted.ensureDeferred
async def test_series_level_data_filters(proxy, study, model_server):
    small = study.small_series_uid
    sops = study.series[small]
    filters = [{"dataKey": "first", "uuid": sops[0]}, {"dataKey": "last", "uuid": sops[-1]}]

    response, result = await proxy.get_json(
        _path(SERIES_FILTER, study, small), params={"data-filters": json.dumps(filters)}
    )

    assert response.code == 200, result
    assert model_server.last()["keys"] == {"first": {"data": sops[0]}, "last": {"data": sops[-1]}}


@pytest_twisted.ensureDeferred
async def test_the_example_model_answers_through_the_proxy(proxy, study, example_model):
    small = study.small_series_uid

    response, result = await proxy.get_json(_path(EXAMPLE, study, small))

    assert response.code == 200, result
    assert result[study.study_uid][small]["metadata"][0]["value"] == len(study.series[small])
    assert example_last(example_model) == {"received": study.series[small], "count": len(study.series[small])}


@pytest_twisted.ensureDeferred
async def test_the_example_model_rebuilds_data_filters(proxy, study, example_model):
    small = study.small_series_uid
    sops = study.series[small]
    filters = [
        {"dataKey": "ct", "uuid": small},
        {"dataKey": "pair", "uuid": small,
         "dataFilter": [{"dataKey": "first", "uuid": sops[2]}, {"dataKey": "second", "uuid": sops[0]}]},
    ]

    response, result = await proxy.get_json(
        _path(EXAMPLE_FILTER, study), params={"data-filters": json.dumps(filters)}
    )

    assert response.code == 200, result
    assert example_last(example_model)["received"] == {
        "ct": {"data": sops},
        "pair": {"data": {"first": {"data": sops[2]}, "second": {"data": sops[0]}}},
    }


def test_read_request_of_the_example_on_real_files(study):
    """The example's parser on a body the encoder made from real Part 10 files."""
    small = study.small_series_uid
    files = [p.read_bytes() for p in study.series_files(small)]
    route = Route("predictions", "m", Target(study.study_uid, small))
    encoder, model, _ = _run(route, (), {Target(study.study_uid, small): files})

    inputs = read_request(encoder.contentType.decode(), model.body())

    assert to_uids(inputs) == study.series[small]
