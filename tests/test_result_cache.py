"""
The per-model result cache (``resultCache`` in models.json): how the field
is read and checked, the in-memory cache on a ``Clock``, and end to end a
repeated request answered without calling the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from tests.support.proxy import make_certificate, start_proxy, write_config
from zhiva.config import ConfigError, ResultCacheConfig, load
from zhiva.result_cache import ResultCache

MODEL = "aaaaaaaa-0000-4000-8000-000000000003"
OTHER = "aaaaaaaa-0000-4000-8000-000000000004"
FAILING = "aaaaaaaa-0000-4000-8000-000000000008"
SERVER = "11111111-1111-4111-8111-111111111111"


def load_model(tmp_path: Path, **fields):
    entry = {"uri": "http://model-api/prediction", "task": "prediction", "supports": ["/studies"], **fields}
    write_config(tmp_path, {}, {MODEL: entry})
    return load(tmp_path).models[MODEL]


# -- models.json -------------------------------------------------------------


def test_result_cache_is_off_by_default(tmp_path):
    assert load_model(tmp_path).result_cache is None


def test_result_cache_fields(tmp_path):
    assert load_model(tmp_path, resultCache={}).result_cache == ResultCacheConfig()
    model = load_model(tmp_path, resultCache={"ttl": 60, "maxEntries": 5, "maxBytes": 1000})
    assert model.result_cache == ResultCacheConfig(ttl=60.0, max_entries=5, max_bytes=1000)


@pytest.mark.parametrize(
    "value, field, words",
    [
        (True, "resultCache", "must be an object"),
        ([], "resultCache", "must be an object"),
        ({"ttl": 0}, "resultCache.ttl", "number of seconds from 1"),
        ({"ttl": "3600"}, "resultCache.ttl", "number of seconds"),
        ({"ttl": True}, "resultCache.ttl", "number of seconds"),
        ({"maxEntries": 0}, "resultCache.maxEntries", "whole number from 1"),
        ({"maxEntries": 2.5}, "resultCache.maxEntries", "whole number"),
        ({"maxBytes": -1}, "resultCache.maxBytes", "whole number"),
        ({"size": 3}, "resultCache.size", "unknown field"),
    ],
)
def test_result_cache_problems_name_file_entry_and_field(tmp_path, value, field, words):
    with pytest.raises(ConfigError) as raised:
        load_model(tmp_path, resultCache=value)

    (problem,) = raised.value.problems
    assert (problem.file, problem.key, problem.field) == ("models.json", MODEL, field)
    assert words in problem.message
    assert f'models.json: entry "{MODEL}": field "{field}"' in str(problem)


# -- the cache ---------------------------------------------------------------


class FakeConfig:
    def __init__(self, *models) -> None:
        self.models = {model.key: model for model in models}


@pytest.fixture
def models(tmp_path):
    cached = load_model(tmp_path, resultCache={"ttl": 100, "maxEntries": 2, "maxBytes": 10})
    plain = load_model(tmp_path)
    return cached, plain


def test_answers_a_repeated_key_until_the_ttl(models):
    cached, _ = models
    clock = Clock()
    cache = ResultCache(clock)
    cache.use(FakeConfig(cached))

    assert cache.get(cached, "k") is None
    cache.put(cached, "k", b"{}")
    clock.advance(99)
    assert cache.get(cached, "k") == b"{}"
    clock.advance(1)
    assert cache.get(cached, "k") is None
    assert (cache.hits, cache.misses) == ({MODEL: 1}, {MODEL: 2})


def test_keeps_the_most_recently_used_within_its_caps(models):
    cached, _ = models
    cache = ResultCache(Clock())
    for key in ("a", "b"):
        cache.put(cached, key, b"1234")
    cache.get(cached, "a")
    cache.put(cached, "c", b"1234")  # three entries: "b" (least recently used) goes
    assert [cache.get(cached, key) is not None for key in ("a", "b", "c")] == [True, False, True]
    cache.put(cached, "big", b"x" * 11)  # over maxBytes: not kept
    assert cache.get(cached, "big") is None
    cache.put(cached, "d", b"12345678")  # 4 + 4 + 8 > 10 bytes: the oldest go
    assert cache.stats()["bytes"] <= 10


def test_a_model_without_result_cache_is_never_cached(models):
    _, plain = models
    cache = ResultCache(Clock())
    cache.put(plain, "k", b"{}")
    assert cache.get(plain, "k") is None and cache.stats()["models"] == {}


def test_a_changed_model_loses_its_results(tmp_path, models):
    cached, _ = models
    cache = ResultCache(Clock())
    cache.use(FakeConfig(cached))
    cache.put(cached, "k", b"{}")
    changed = load_model(tmp_path, resultCache={"ttl": 100, "maxEntries": 2, "maxBytes": 10}, timeout=5)

    cache.use(FakeConfig(changed))
    cache.put(cached, "late", b"{}")  # a request that started under the old config

    assert cache.get(changed, "k") is None
    assert cache.stats()["entries"] == 0


# -- end to end --------------------------------------------------------------


@pytest.fixture
def setup(tmp_path, orthanc, model_server):
    servers = {SERVER: {"uri": orthanc.dicomweb, "isDefault": True}}
    series = ["/studies/series"]
    models = {
        MODEL: {"uri": model_server.url + "/prediction", "task": "prediction", "supports": series,
                "resultCache": {"ttl": 3600, "maxEntries": 10}},
        OTHER: {"uri": model_server.url + "/prediction", "task": "prediction", "supports": series},
        FAILING: {"uri": model_server.url + "/fail500", "task": "prediction", "supports": series,
                  "resultCache": {}},
    }
    config = write_config(tmp_path / "config", servers, models)
    proxy = start_proxy(reactor, config, *make_certificate(tmp_path), "--status-page")
    yield proxy, config, servers, models
    pytest_twisted.blockon(ensureDeferred(proxy.stop()))


def path_of(study, model: str) -> str:
    return f"/predictions/{model}/studies/{study.study_uid}/series/{study.small_series_uid}"


def seq(model_server) -> int:
    return (model_server.last() or {}).get("seq", 0)


@pytest_twisted.ensureDeferred
async def test_a_repeated_request_is_answered_without_the_model(setup, study, model_server):
    proxy, *_ = setup
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        first, body = await proxy.get(path_of(study, MODEL))
        before = seq(model_server)
        again, again_body = await proxy.get(path_of(study, MODEL))
    finally:
        globalLogPublisher.removeObserver(events.append)

    assert first.code == again.code == 200 and again_body == body
    assert seq(model_server) == before  # no model call
    access = [e for e in events if e.get("log_namespace") == "zhiva.access" and e.get("status") == 200]
    assert [e["cache"] for e in access] == ["", "result"]
    metrics = (await proxy.get("/metrics"))[1].decode()
    assert f'zhiva_result_cache_hits_total{{model="{MODEL}"}} 1.0' in metrics
    assert f'zhiva_result_cache_misses_total{{model="{MODEL}"}} 1.0' in metrics
    _, status = await proxy.get("/status")
    assert json.loads(status)["caches"]["results"]["models"][MODEL]["hits"] == 1


@pytest_twisted.ensureDeferred
async def test_models_without_it_and_failures_always_call_the_model(setup, study, model_server):
    proxy, *_ = setup
    before = seq(model_server)
    codes = []
    for model in (OTHER, OTHER, FAILING, FAILING):
        response, _ = await proxy.get(path_of(study, model))
        codes.append(response.code)

    assert codes == [200, 200, 502, 502]
    assert seq(model_server) == before + 4


@pytest_twisted.ensureDeferred
async def test_a_reload_that_changes_the_model_drops_its_results(setup, study, model_server):
    proxy, config, servers, models = setup
    await proxy.get(path_of(study, MODEL))
    models[MODEL]["timeout"] = 300
    write_config(config, servers, models)
    assert await proxy.service.reload()
    before = seq(model_server)

    response, _ = await proxy.get(path_of(study, MODEL))
    again, _ = await proxy.get(path_of(study, MODEL))

    assert response.code == again.code == 200
    assert seq(model_server) == before + 1  # called once after the change, then cached again
