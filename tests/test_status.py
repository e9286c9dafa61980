"""``GET /status``: up/down per server and model, JSON or HTML, never a secret."""
from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.conftest import AUTH_USERS
from tests.support.proxy import free_port, make_certificate, start_proxy, write_config

UP_SERVER = "77777777-7777-4777-8777-777777777771"
AUTH_SERVER = "77777777-7777-4777-8777-777777777772"
DOWN_MODEL = "77777777-7777-4777-8777-777777777773"
UP_MODEL = "77777777-7777-4777-8777-777777777774"
QUIET_MODEL = "77777777-7777-4777-8777-777777777775"


@pytest.fixture
def config(tmp_path, orthanc, orthanc_auth, model_server):
    user, password = next(iter(AUTH_USERS.items()))
    model = {"task": "prediction", "supports": ["/studies"]}
    return write_config(
        tmp_path / "config",
        {
            UP_SERVER: {"uri": orthanc.dicomweb, "statusUri": orthanc.url + "/system", "isDefault": True},
            AUTH_SERVER: {
                "uri": orthanc_auth.dicomweb,
                "statusUri": orthanc_auth.url + "/system?token=do-not-show",
                "authType": "basicAuth",
                "login": user,
                "password": password,
            },
        },
        {
            UP_MODEL: {**model, "uri": model_server.url + "/prediction", "statusUri": model_server.url + "/status"},
            DOWN_MODEL: {**model, "uri": model_server.url + "/prediction",
                         "statusUri": f"http://127.0.0.1:{free_port()}/health"},
            QUIET_MODEL: {**model, "uri": model_server.url + "/prediction"},
        },
    )


async def _status(tmp_path, config, *args, headers=None):
    proxy = start_proxy(reactor, config, *make_certificate(tmp_path), *args)
    try:
        return await proxy.get("/status", headers=headers)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_status_reports_each_upstream(tmp_path, config):
    response, body = await _status(tmp_path, config, "--status-page")

    assert response.code == 200
    report = json.loads(body)
    assert report["servers"][UP_SERVER]["status"] == "up"
    # Orthanc with auth answers 401 to an anonymous status check: not healthy.
    assert report["servers"][AUTH_SERVER]["status"] == "down"
    assert report["servers"][AUTH_SERVER]["detail"] == "HTTP 401"
    assert report["models"][UP_MODEL]["status"] == "up"
    assert report["models"][DOWN_MODEL]["status"] == "down"
    assert report["models"][DOWN_MODEL]["detail"] == "connection refused"
    assert report["models"][QUIET_MODEL]["status"] == "unknown"
    assert report["models"][UP_MODEL]["latencyMs"] >= 0
    assert report["models"][UP_MODEL]["checkedAt"].endswith("+00:00")
    for secret in [*AUTH_USERS.values(), "do-not-show"]:
        assert secret.encode() not in body


@pytest_twisted.ensureDeferred
async def test_status_page_for_a_browser_is_html(tmp_path, config):
    response, body = await _status(tmp_path, config, "--status-page", headers={"Accept": "text/html"})

    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    assert b"<table>" in body and UP_MODEL.encode() in body


@pytest_twisted.ensureDeferred
async def test_status_page_from_the_environment(tmp_path, config, monkeypatch):
    monkeypatch.setenv("ZHIVA_SHOW_STATUS_PAGE", "true")

    response, _ = await _status(tmp_path, config)

    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_status_page_is_off_by_default(tmp_path, config, monkeypatch):
    monkeypatch.delenv("ZHIVA_SHOW_STATUS_PAGE", raising=False)

    response, body = await _status(tmp_path, config)

    assert response.code == 404
    assert response.headers.getRawHeaders("content-type") == ["application/problem+json"]
