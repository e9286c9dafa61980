"""
Request coalescing: identical concurrent requests share one run. The
``Coalescer`` by itself, then end to end through a counting front to a real
Orthanc and the test model API, whose ``/hold`` route keeps the model call
open until the test releases it (no timing anywhere).
"""
from __future__ import annotations

import json
import secrets

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from tests.support.counting import CountingFront
from tests.support.proxy import make_certificate, start_proxy, write_config
from zhiva.coalesce import Coalescer

# -- the Coalescer -----------------------------------------------------------


def test_joiners_share_one_run_and_its_result():
    coalescer, started = Coalescer(), []

    def start():
        started.append(Deferred())
        return started[-1], "context"

    waiting = [coalescer.join("key", start) for _ in range(3)]
    started[0].callback(b"result")

    assert len(started) == 1
    assert [started_here for _, _, started_here in waiting] == [True, False, False]
    assert [d.result for d, _, _ in waiting] == [b"result"] * 3
    assert coalescer.coalesced == 2 and len(coalescer) == 0
    coalescer.join("key", start)
    assert len(started) == 2  # an ended run is not joined again


def test_an_error_reaches_every_joiner():
    coalescer, work = Coalescer(), Deferred()
    waiting = [coalescer.join("key", lambda: (work, None))[0] for _ in range(2)]
    failures = []
    for d in waiting:
        d.addErrback(failures.append)

    work.errback(ValueError("model said no"))

    assert [f.value.args for f in failures] == [("model said no",)] * 2


def test_one_leaving_keeps_the_run_the_last_leaving_cancels_it():
    coalescer = Coalescer()
    cancelled = []
    work = Deferred(lambda d: cancelled.append(True))
    first = coalescer.join("key", lambda: (work, None))[0]
    second = coalescer.join("key", lambda: (work, None))[0]
    first.addErrback(lambda f: f.trap(CancelledError))
    second.addErrback(lambda f: f.trap(CancelledError))

    first.cancel()
    assert not cancelled and len(coalescer) == 1
    second.cancel()
    assert cancelled == [True] and len(coalescer) == 0


def test_a_run_that_fails_at_once_still_answers_its_starter():
    coalescer, work = Coalescer(), Deferred()
    work.errback(ValueError("queue full"))

    d, _, started = coalescer.join("key", lambda: (work, None))

    failures = []
    d.addErrback(failures.append)
    assert started and len(coalescer) == 0
    assert failures[0].check(ValueError)


def test_different_keys_do_not_share():
    coalescer, started = Coalescer(), []

    def start():
        started.append(Deferred())
        return started[-1], None

    coalescer.join("a", start)
    coalescer.join("b", start)
    assert len(started) == 2 and coalescer.coalesced == 0


# -- end to end --------------------------------------------------------------

SERVER = "11111111-1111-4111-8111-111111111111"
HELD = "aaaaaaaa-0000-4000-8000-000000000003"


@pytest.fixture
def setup(tmp_path, orthanc, model_server):
    """A proxy before a counting front; the model holds every call under a name fresh per test."""
    front = CountingFront(reactor, orthanc.dicomweb)
    hold = secrets.token_hex(4)
    servers = {SERVER: {"uri": front.url, "isDefault": True}}
    models = {
        HELD: {
            "uri": f"{model_server.url}/hold?name={hold}",
            "task": "prediction",
            "supports": ["/studies/series"],
        }
    }
    config = write_config(tmp_path / "config", servers, models)
    proxy = start_proxy(reactor, config, *make_certificate(tmp_path))
    yield proxy, front, hold, config, servers, models
    model_server.release(hold)  # never leave a model thread waiting
    pytest_twisted.blockon(ensureDeferred(proxy.stop()))
    pytest_twisted.blockon(front.close())


def path_of(study) -> str:
    return f"/predictions/{HELD}/studies/{study.study_uid}/series/{study.small_series_uid}"


async def until(condition, what: str) -> None:
    for _ in range(3000):
        if condition():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError(f"never: {what}")


def seq(model_server) -> int:
    return (model_server.last() or {}).get("seq", 0)


@pytest_twisted.ensureDeferred
async def test_concurrent_identical_requests_make_one_pacs_fetch_and_one_model_call(setup, study, model_server):
    proxy, front, hold, *_ = setup
    relay = proxy.service.relay
    before = seq(model_server)
    n = 6

    requests = [ensureDeferred(proxy.get(path_of(study))) for _ in range(n)]
    await until(lambda: relay.coalescer.coalesced == n - 1, "every request joined the first")
    await until(lambda: seq(model_server) == before + 1, "the model has the call")
    model_server.release(hold)
    answers = await gatherResults(requests)

    assert [response.code for response, _ in answers] == [200] * n
    assert len({body for _, body in answers}) == 1
    assert seq(model_server) == before + 1  # one model call
    assert len(front.wado()) == 1  # one PACS fetch
    assert model_server.last()["sops"] == study.series[study.small_series_uid]
    metrics = (await proxy.get("/metrics"))[1].decode()
    assert f"zhiva_coalesced_requests_total {n - 1}.0" in metrics
    assert len(relay.coalescer) == 0


@pytest_twisted.ensureDeferred
async def test_a_viewer_hanging_up_leaves_the_others_their_answer(setup, study, model_server):
    proxy, front, hold, *_ = setup
    relay = proxy.service.relay
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        leaving = proxy.client.get(proxy.url + path_of(study))  # it starts the run
        await until(lambda: len(relay.coalescer) == 1, "the first request's run started")
        staying = ensureDeferred(proxy.get(path_of(study)))
        await until(lambda: relay.coalescer.coalesced == 1, "the second joined the first")
        leaving.cancel()
        leaving.addErrback(lambda _: None)
        await until(lambda: any(e.get("status") == 499 for e in events), "the hang-up is logged")
        assert len(relay.coalescer) == 1  # the run goes on for the other viewer
        model_server.release(hold)
        response, body = await staying
    finally:
        globalLogPublisher.removeObserver(events.append)

    assert response.code == 200, body
    assert len(front.wado()) == 1
    shared = [e for e in events if e.get("log_namespace") == "zhiva.access" and e.get("status") == 200]
    assert [e["cache"] for e in shared] == ["shared"]


@pytest_twisted.ensureDeferred
async def test_when_every_viewer_hangs_up_the_run_is_cancelled(setup, study, model_server):
    proxy, front, hold, *_ = setup
    relay = proxy.service.relay
    before = seq(model_server)
    requests = [proxy.client.get(proxy.url + path_of(study)) for _ in range(2)]
    await until(lambda: relay.coalescer.coalesced == 1 and seq(model_server) == before + 1, "both wait on the model")

    for request in requests:
        request.cancel()
        request.addErrback(lambda _: None)
    await until(lambda: len(relay.coalescer) == 0, "the run is gone")
    model_server.release(hold)
    response, body = await proxy.get(path_of(study))

    assert response.code == 200, body
    assert seq(model_server) == before + 2  # the next request ran afresh


@pytest_twisted.ensureDeferred
async def test_requests_under_different_configs_do_not_share(setup, study, model_server):
    proxy, front, hold, config, servers, models = setup
    relay = proxy.service.relay
    before = seq(model_server)
    old = ensureDeferred(proxy.get(path_of(study)))
    await until(lambda: seq(model_server) == before + 1, "the model has the first call")

    models[HELD]["timeout"] = 300  # the model's config changes; the route does not
    write_config(config, servers, models)
    assert await proxy.service.reload()
    new = ensureDeferred(proxy.get(path_of(study)))
    await until(lambda: len(relay.coalescer) == 2, "a second run started")
    model_server.release(hold)
    answers = await gatherResults([old, new])

    assert [response.code for response, _ in answers] == [200, 200]
    assert relay.coalescer.coalesced == 0
    assert seq(model_server) == before + 2 and len(front.wado()) == 2


@pytest_twisted.ensureDeferred
async def test_no_coalescing_option_runs_each_request(tmp_path, orthanc, model_server, study):
    front = CountingFront(reactor, orthanc.dicomweb)
    config = write_config(
        tmp_path / "config",
        {SERVER: {"uri": front.url, "isDefault": True}},
        {HELD: {"uri": model_server.url + "/prediction", "task": "prediction", "supports": ["/studies/series"]}},
    )
    proxy = start_proxy(reactor, config, *make_certificate(tmp_path), "--no-coalescing", "--status-page")
    try:
        answers = await gatherResults([ensureDeferred(proxy.get(path_of(study))) for _ in range(3)])
        _, status = await proxy.get("/status")
    finally:
        await proxy.stop()
        await front.close()

    assert [response.code for response, _ in answers] == [200] * 3
    assert len(front.wado()) == 3
    assert json.loads(status)["caches"]["coalescing"] == {"enabled": False, "inFlight": 0, "coalescedRequests": 0}
