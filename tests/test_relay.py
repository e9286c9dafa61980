"""
End to end over HTTPS: viewer -> proxy -> real Orthanc -> proxy -> real model
API -> proxy -> viewer, for every route, filter and failure of SPEC.md.
"""
from __future__ import annotations

import json
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from tests.conftest import AUTH_USERS
from tests.support.proxy import free_port, make_certificate, start_proxy, write_config

SERVER = "11111111-1111-4111-8111-111111111111"
AUTH_SERVER = "22222222-2222-4222-8222-222222222222"
BAD_PASSWORD_SERVER = "33333333-3333-4333-8333-333333333333"
DOWN_SERVER = "44444444-4444-4444-8444-444444444444"

MODELS = {
    "segmentation": "aaaaaaaa-0000-4000-8000-000000000001",
    "annotation": "aaaaaaaa-0000-4000-8000-000000000002",
    "prediction": "aaaaaaaa-0000-4000-8000-000000000003",
}
SERIES_ONLY = "aaaaaaaa-0000-4000-8000-000000000004"
STUDY_FILTER = "aaaaaaaa-0000-4000-8000-000000000005"
SERIES_FILTER = "aaaaaaaa-0000-4000-8000-000000000006"
DOUBLE = "aaaaaaaa-0000-4000-8000-000000000007"
FAIL500 = "aaaaaaaa-0000-4000-8000-000000000008"
NONJSON = "aaaaaaaa-0000-4000-8000-000000000009"
BADSHAPE = "aaaaaaaa-0000-4000-8000-00000000000a"
SLOW = "aaaaaaaa-0000-4000-8000-00000000000b"
DOWN_MODEL = "aaaaaaaa-0000-4000-8000-00000000000c"
PATIENT = "aaaaaaaa-0000-4000-8000-00000000000d"

ALL_LEVELS = ["/studies", "/studies/series", "/studies/series/instances"]
KIND = {"segmentation": "segmentations", "annotation": "annotations", "prediction": "predictions"}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory, orthanc, orthanc_auth, model_server):
    directory = tmp_path_factory.mktemp("config")
    user, password = next(iter(AUTH_USERS.items()))
    servers = {
        SERVER: {"uri": orthanc.dicomweb, "isDefault": True},
        AUTH_SERVER: {
            "uri": orthanc_auth.dicomweb,
            "authType": "basicAuth",
            "login": user,
            "password": password,
        },
        BAD_PASSWORD_SERVER: {
            "uri": orthanc_auth.dicomweb,
            "authType": "basicAuth",
            "login": user,
            "password": "wrong-password",
        },
        DOWN_SERVER: {"uri": f"http://127.0.0.1:{free_port()}/dicom-web", "timeout": 5},
    }

    def model(path: str, task: str, **extra):
        return {"uri": model_server.url + path, "task": task, "supports": ALL_LEVELS, **extra}

    models = {key: model("/" + task, task) for task, key in MODELS.items()}
    models.update(
        {
            SERIES_ONLY: {**model("/segmentation", "segmentation"), "supports": ["/studies/series"]},
            STUDY_FILTER: model(
                "/prediction",
                "prediction",
                dataFilter=[
                    {"dataKey": "ct", "title": "CT series"},
                    {
                        "dataKey": "pair",
                        "title": "Two slices",
                        "dataFilter": [
                            {"dataKey": "first", "title": "First"},
                            {"dataKey": "second", "title": "Second"},
                        ],
                    },
                ],
            ),
            SERIES_FILTER: model(
                "/prediction",
                "prediction",
                dataFilter=[
                    {"dataKey": "first", "title": "First slice"},
                    {"dataKey": "last", "title": "Last slice"},
                ],
            ),
            DOUBLE: model("/segmentation?double=1", "segmentation"),
            FAIL500: model("/fail500", "prediction"),
            NONJSON: model("/nonjson", "prediction"),
            BADSHAPE: model("/badshape", "prediction"),
            SLOW: model("/slow?seconds=5", "prediction", timeout=1),
            PATIENT: model("/slow?seconds=3", "prediction"),
            DOWN_MODEL: {
                "uri": f"http://127.0.0.1:{free_port()}/predict?apiKey=model-api-key-42",
                "task": "prediction",
                "supports": ALL_LEVELS,
            },
        }
    )
    return write_config(directory, servers, models)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def proxy(config_dir, certificate):
    running = start_proxy(reactor, config_dir, *certificate)
    yield running
    pytest_twisted.blockon(ensureDeferred(running.stop()))


def route(kind_task: str, level: str, study, series=None, sop=None, model=None) -> str:
    model = model or MODELS[kind_task]
    path = f"/{KIND[kind_task]}/{model}/studies/{study.study_uid}"
    if level != "/studies":
        path += f"/series/{series}"
    if level == "/studies/series/instances":
        path += f"/instances/{sop}"
    return path


@pytest.mark.parametrize("task", sorted(MODELS))
@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest_twisted.ensureDeferred
async def test_every_route_relays_the_requested_instances(proxy, study, model_server, task, level):
    small = study.small_series_uid
    sops = study.series[small]
    path = route(task, level, study, small, sops[1]) + f"?server={AUTH_SERVER}"

    response, result = await proxy.get_json(path)

    assert response.code == 200, result
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert response.headers.getRawHeaders("access-control-allow-origin") == ["*"]
    expected = [sops[1]] if level.endswith("instances") else sops
    received = model_server.last()
    assert received["path"] == "/" + task
    assert sorted(received["sops"]) == sorted(expected)
    assert study.study_uid in result
    assert small in result[study.study_uid]


@pytest_twisted.ensureDeferred
async def test_default_server_relays_a_big_series(proxy, study, model_server):
    big = study.big_series_uid

    response, result = await proxy.get_json(route("segmentation", "/studies/series", study, big))

    assert response.code == 200, result
    assert model_server.last()["sops"] == study.series[big]
    assert len(result[study.study_uid][big]) == len(study.series[big]) >= 100


@pytest_twisted.ensureDeferred
async def test_double_encoded_result_reaches_the_viewer_as_an_object(proxy, study):
    small = study.small_series_uid
    path = route("segmentation", "/studies/series", study, small, model=DOUBLE)

    response, result = await proxy.get_json(path)

    assert response.code == 200
    assert isinstance(result, dict)
    segments = result[study.study_uid][small][study.series[small][0]]["segments"]
    assert segments[0]["className"] == "lung"


@pytest_twisted.ensureDeferred
async def test_study_level_data_filters(proxy, study, model_server):
    small = study.small_series_uid
    sops = study.series[small]
    filters = [
        {"dataKey": "ct", "uuid": small},
        {
            "dataKey": "pair",
            "uuid": small,
            "dataFilter": [
                {"dataKey": "first", "uuid": sops[0]},
                {"dataKey": "second", "uuid": sops[2]},
            ],
        },
    ]
    path = route("prediction", "/studies", study, model=STUDY_FILTER)

    response, result = await proxy.get_json(path, params={"data-filters": json.dumps(filters)})

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
    path = route("prediction", "/studies/series", study, small, model=SERIES_FILTER)

    response, result = await proxy.get_json(path, params={"data-filters": json.dumps(filters)})

    assert response.code == 200, result
    assert model_server.last()["keys"] == {"first": {"data": sops[0]}, "last": {"data": sops[-1]}}


REJECTIONS = [
    # (description, path builder, query, status, words in detail)
    ("unknown model", lambda s: f"/predictions/{'b' * 8}-0000-4000-8000-000000000000/studies/{s.study_uid}", {}, 404, "no model"),
    ("kind does not match task", lambda s: f"/predictions/{MODELS['segmentation']}/studies/{s.study_uid}", {}, 400, "segmentation model"),
    ("level not supported", lambda s: f"/segmentations/{SERIES_ONLY}/studies/{s.study_uid}", {}, 400, "does not support /studies"),
    ("unknown server", lambda s: f"/predictions/{MODELS['prediction']}/studies/{s.study_uid}", {"server": "55555555-5555-4555-8555-555555555555"}, 404, "no server"),
    ("filters not JSON", lambda s: f"/predictions/{STUDY_FILTER}/studies/{s.study_uid}", {"data-filters": "[{"}, 400, "not valid JSON"),
    ("filter key unknown", lambda s: f"/predictions/{STUDY_FILTER}/studies/{s.study_uid}", {"data-filters": '[{"dataKey": "mri", "uuid": "1.2"}]'}, 400, "not an input of this model"),
    ("filter uid invalid", lambda s: f"/predictions/{STUDY_FILTER}/studies/{s.study_uid}", {"data-filters": '[{"dataKey": "ct", "uuid": "1.2/x"}]'}, 400, "not a valid DICOM UID"),
    ("filter not a list", lambda s: f"/predictions/{STUDY_FILTER}/studies/{s.study_uid}", {"data-filters": '{"dataKey": "ct"}'}, 400, "JSON array"),
    ("nested filter at series level", lambda s: f"/predictions/{SERIES_FILTER}/studies/{s.study_uid}/series/{s.small_series_uid}", {"data-filters": '[{"dataKey": "first", "uuid": "1.2", "dataFilter": [{"dataKey": "x", "uuid": "1.3"}]}]'}, 400, "study level only"),
    ("filters on instance route", lambda s: f"/predictions/{SERIES_FILTER}/studies/{s.study_uid}/series/1.2/instances/1.3", {"data-filters": '[{"dataKey": "first", "uuid": "1.2"}]'}, 400, "study and series routes only"),
    ("filters for a model without inputs", lambda s: f"/predictions/{MODELS['prediction']}/studies/{s.study_uid}", {"data-filters": '[{"dataKey": "ct", "uuid": "1.2"}]'}, 400, "takes no data-filters"),
]


@pytest.mark.parametrize("case", REJECTIONS, ids=[c[0] for c in REJECTIONS])
@pytest_twisted.ensureDeferred
async def test_bad_requests_are_refused_before_any_upstream_call(proxy, study, model_server, case):
    _, build, params, status, words = case
    before = model_server.last()

    response, problem = await proxy.get_json(build(study), params=params)

    assert response.code == status
    assert response.headers.getRawHeaders("content-type") == ["application/problem+json"]
    assert problem["status"] == status and problem["title"] and problem["type"]
    assert words in problem["detail"]
    assert model_server.last() == before


@pytest.mark.parametrize("bad", ["1.2.3/../4", "1.2.3?x=1", "1" + ".2" * 32, "abc", "1..2", "1.2."])
@pytest.mark.parametrize("position", ["study", "series", "instance"])
@pytest_twisted.ensureDeferred
async def test_invalid_uids_are_bad_requests(proxy, study, model_server, bad, position):
    uids = {"study": study.study_uid, "series": study.small_series_uid, "instance": "1.2.3"}
    uids[position] = bad
    encoded = {k: quote(v, safe="") for k, v in uids.items()}
    path = (
        f"/predictions/{MODELS['prediction']}/studies/{encoded['study']}"
        f"/series/{encoded['series']}/instances/{encoded['instance']}"
    )
    before = model_server.last()

    response, problem = await proxy.get_json(path)

    assert response.code == 400
    assert "not a valid DICOM UID" in problem["detail"]
    assert bad[:40] in problem["detail"]
    assert model_server.last() == before


@pytest.mark.parametrize(
    "path",
    ["/", "/nothing", "/predictions", f"/predictions/{MODELS['prediction']}", f"/predictions/{MODELS['prediction']}/studies",
     f"/predictions/{MODELS['prediction']}/studies/1.2/series", f"/predictions/{MODELS['prediction']}/studies/1.2/frames/1",
     "/predictions//studies/1.2", f"/predictions/{MODELS['prediction']}/studies/1.2/series/1.3/instances/1.4/frames/1"],
)
@pytest_twisted.ensureDeferred
async def test_unknown_paths_are_problem_404(proxy, path):
    response, problem = await proxy.get_json(path)

    assert response.code == 404
    assert response.headers.getRawHeaders("content-type") == ["application/problem+json"]
    assert problem["status"] == 404


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_problem_405(proxy, study):
    path = route("prediction", "/studies", study)

    response = await proxy.client.post(proxy.url + path, data=b"x")
    problem = json.loads(await response.content())

    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["GET, OPTIONS"]
    assert response.headers.getRawHeaders("access-control-allow-origin") == ["*"]
    assert problem["status"] == 405


@pytest_twisted.ensureDeferred
async def test_cors_preflight(proxy, study):
    path = route("prediction", "/studies", study)

    response = await proxy.client.request(
        "OPTIONS",
        proxy.url + path,
        headers={
            "Origin": "https://viewer.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    await response.content()

    assert response.code == 204
    allowed = response.headers.getRawHeaders("access-control-allow-headers")[0]
    assert "Authorization" in allowed and "Accept" in allowed
    assert "GET" in response.headers.getRawHeaders("access-control-allow-methods")[0]
    assert response.headers.getRawHeaders("access-control-allow-origin") == ["*"]


UPSTREAM_FAILURES = [
    # (description, model, server, status, words in detail)
    ("model answers 500", FAIL500, None, 502, "answered HTTP 500"),
    ("model answers non-JSON", NONJSON, None, 502, "not JSON"),
    ("model answers a wrong shape", BADSHAPE, None, 502, "invalid prediction result"),
    ("model slower than its timeout", SLOW, None, 504, "did not answer within 1 s"),
    ("model down", DOWN_MODEL, None, 502, "unreachable"),
    ("PACS down", MODELS["prediction"], DOWN_SERVER, 502, "unreachable"),
    ("PACS refuses the password", MODELS["prediction"], BAD_PASSWORD_SERVER, 502, "HTTP 401"),
]


@pytest.mark.parametrize("case", UPSTREAM_FAILURES, ids=[c[0] for c in UPSTREAM_FAILURES])
@pytest_twisted.ensureDeferred
async def test_upstream_failures(proxy, study, case):
    _, model, server, status, words = case
    path = route("prediction", "/studies/series", study, study.small_series_uid, model=model)
    params = {"server": server or AUTH_SERVER}

    response, problem = await proxy.get_json(path, params=params)

    assert response.code == status, problem
    assert words in problem["detail"]
    assert model in problem["detail"] or (server and server in problem["detail"])
    assert "wrong-password" not in problem["detail"]
    assert "model-api-key-42" not in problem["detail"]  # a model URL's query may hold a key


@pytest_twisted.ensureDeferred
async def test_unknown_study_at_the_pacs_is_404(proxy, model_server):
    before = model_server.last()
    path = f"/predictions/{MODELS['prediction']}/studies/1.2.3.4.5.6.7.8.9"

    response, problem = await proxy.get_json(path)

    assert response.code == 404
    assert "1.2.3.4.5.6.7.8.9 not found" in problem["detail"]
    assert model_server.last() == before


@pytest_twisted.ensureDeferred
async def test_viewer_hanging_up_cancels_the_upstream_request(proxy, study, model_server):
    events = []
    globalLogPublisher.addObserver(events.append)
    path = route("prediction", "/studies/series", study, study.small_series_uid, model=PATIENT)
    seq = (model_server.last() or {}).get("seq", 0)
    try:
        request = proxy.client.get(proxy.url + path, params={"server": AUTH_SERVER})
        while (model_server.last() or {}).get("seq", 0) == seq:  # until the model has it
            await deferLater(reactor, 0.05)
        request.cancel()
        request.addErrback(lambda _: None)  # our own cancel
        while not any(e.get("status") == 499 for e in events):
            await deferLater(reactor, 0.05)
    finally:
        globalLogPublisher.removeObserver(events.append)

    (access,) = [e for e in events if e.get("status") == 499]
    assert access["model"] == PATIENT
    response, _ = await proxy.get_json(
        route("prediction", "/studies/series", study, study.small_series_uid), params={"server": AUTH_SERVER}
    )
    assert response.code == 200
