"""
In-process models (``plugin:NAME``): they get pydicom datasets, run off the
reactor thread, and go through the same timeout and result checks as a
remote model.
"""
from __future__ import annotations

import threading
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from zope.interface import implementer

from tests.support.proxy import make_certificate, start_proxy, write_config
from zhiva import registry
from zhiva.interfaces import IModel

SERVER = "12121212-1212-4121-8121-121212121212"
MODELS = {
    name: f"cccccccc-0000-4000-8000-00000000000{i}"
    for i, name in enumerate(["count", "broken", "sleepy", "invalid"], 1)
}


@implementer(IModel)
class Count:
    """Reports how many datasets it got and on which thread it ran."""

    name = "count"
    threads: list[str] = []

    def infer(self, inputs, target):
        self.threads.append(threading.current_thread().name)
        series = {
            ds.SeriesInstanceUID: {
                "metadata": [{"dataType": "text", "title": "Modality", "value": ds.Modality}]
            }
            for ds in inputs
        }
        return {
            target.study: {
                "metadata": [{"dataType": "number", "title": "Instances", "value": len(inputs)}],
                **series,
            }
        }


@implementer(IModel)
class Broken:
    name = "broken"

    def infer(self, inputs, target):
        raise RuntimeError("weights file missing")


@implementer(IModel)
class Sleepy:
    name = "sleepy"

    def infer(self, inputs, target):
        time.sleep(2)
        return Count().infer(inputs, target)


@implementer(IModel)
class Invalid:
    name = "invalid"

    def infer(self, inputs, target):
        return {target.study: {"metadata": [{"dataType": "colour", "title": "x", "value": 1}]}}


@pytest.fixture
def proxy(tmp_path, orthanc_auth, monkeypatch):
    from tests.conftest import AUTH_USERS

    plugins = {p.name: p for p in (Count(), Broken(), Sleepy(), Invalid())}
    monkeypatch.setattr(registry, "models", lambda: plugins)
    user, password = next(iter(AUTH_USERS.items()))
    config = write_config(
        tmp_path / "config",
        {SERVER: {"uri": orthanc_auth.dicomweb, "isDefault": True, "authType": "basicAuth",
                  "login": user, "password": password}},
        {
            key: {"uri": f"plugin:{name}", "task": "prediction",
                  "supports": ["/studies", "/studies/series"],
                  **({"timeout": 1} if name == "sleepy" else {})}
            for name, key in MODELS.items()
        },
    )
    running = start_proxy(reactor, config, *make_certificate(tmp_path))
    yield running
    pytest_twisted.blockon(ensureDeferred(running.stop()))


def _path(name, study):
    return f"/predictions/{MODELS[name]}/studies/{study.study_uid}/series/{study.small_series_uid}"


@pytest_twisted.ensureDeferred
async def test_in_process_model_gets_datasets_in_a_worker_thread(proxy, study):
    Count.threads.clear()

    response, result = await proxy.get_json(_path("count", study))

    assert response.code == 200, result
    assert result[study.study_uid]["metadata"][0]["value"] == len(study.series[study.small_series_uid])
    assert result[study.study_uid][study.small_series_uid]["metadata"][0]["value"] == "CT"
    assert Count.threads and all("zhiva-models" in name for name in Count.threads)


@pytest.mark.parametrize(
    "name, status, words",
    [
        ("broken", 502, "failed: RuntimeError: weights file missing"),
        ("sleepy", 504, "did not answer within 1 s"),
        ("invalid", 502, "invalid prediction result"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_in_process_model_failures(proxy, study, name, status, words):
    response, problem = await proxy.get_json(_path(name, study))

    assert response.code == status
    assert words in problem["detail"]
    assert MODELS[name] in problem["detail"]
    # The proxy keeps serving while a slow model still holds its thread.
    response, _ = await proxy.get_json(_path("count", study))
    assert response.code == 200


def test_unknown_plugin_is_a_config_error(tmp_path):
    from zhiva import config

    write_config(
        tmp_path,
        {},
        {MODELS["count"]: {"uri": "plugin:no-such-model", "task": "prediction", "supports": ["/studies"]}},
    )
    with pytest.raises(config.ConfigError) as error:
        config.load(tmp_path)

    (problem,) = error.value.problems
    assert (problem.file, problem.key, problem.field) == ("models.json", MODELS["count"], "uri")
    assert "no in-process model plugin 'no-such-model'" in problem.message
