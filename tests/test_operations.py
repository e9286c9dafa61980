"""
Running it like a hospital service: reload on SIGHUP (config and
certificate), access log, metrics, health, check-config, graceful stop.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
from base64 import b64encode

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from tests.conftest import AUTH_USERS
from tests.support.proxy import make_certificate, start_proxy, write_config
from zhiva.cli import main as zhiva_cli

SERVER = "15151515-1515-4151-8151-151515151515"
MODEL = "eeeeeeee-0000-4000-8000-000000000001"
SLOW = "eeeeeeee-0000-4000-8000-000000000002"
NEW = "eeeeeeee-0000-4000-8000-000000000003"


@pytest.fixture
def setup(tmp_path, orthanc_auth, model_server):
    user, password = next(iter(AUTH_USERS.items()))
    servers = {SERVER: {"uri": orthanc_auth.dicomweb, "isDefault": True, "authType": "basicAuth",
                        "login": user, "password": password}}
    models = {
        MODEL: {"uri": model_server.url + "/fail500", "task": "prediction", "supports": ["/studies/series"]},
        SLOW: {"uri": model_server.url + "/slow?seconds=2", "task": "prediction", "supports": ["/studies/series"]},
    }
    config = write_config(tmp_path / "config", servers, models)
    cert, key = make_certificate(tmp_path)
    events = []
    globalLogPublisher.addObserver(events.append)
    proxy = start_proxy(reactor, config, cert, key, "--grace", "10")
    yield proxy, config, servers, models, (cert, key), events
    globalLogPublisher.removeObserver(events.append)
    if proxy.service.running:
        pytest_twisted.blockon(ensureDeferred(proxy.stop()))


def _path(study, model=MODEL):
    return f"/predictions/{model}/studies/{study.study_uid}/series/{study.small_series_uid}"


def _lines(events) -> list[str]:
    return [formatEvent(e) for e in events]


@pytest_twisted.ensureDeferred
async def test_valid_change_takes_effect_for_the_next_request(setup, study, model_server):
    proxy, config, servers, models, _, events = setup
    response, _ = await proxy.get_json(_path(study))
    assert response.code == 502  # /fail500

    models[MODEL]["uri"] = model_server.url + "/prediction"
    models[NEW] = {**models[MODEL], "supports": ["/studies"]}
    write_config(config, servers, models)
    assert await proxy.service.reload() is True

    response, result = await proxy.get_json(_path(study))
    assert response.code == 200, result
    lines = _lines(events)
    assert any(f'models.json: entry "{MODEL}" changed: uri' in line for line in lines)
    assert any(f'models.json: entry "{NEW}" added' in line for line in lines)


@pytest.mark.parametrize("breakage", ["bad json", "bad field", "missing cert", "key of another cert"])
@pytest_twisted.ensureDeferred
async def test_invalid_change_keeps_the_running_config(setup, study, tmp_path, breakage):
    proxy, config, servers, models, (cert, key), events = setup
    if breakage == "bad json":
        (config / "models.json").write_text('{"oops": ')
        expected = "models.json: is not valid JSON"
    elif breakage == "bad field":
        models[MODEL]["supports"] = ["/everything"]
        write_config(config, servers, models)
        expected = f'models.json: entry "{MODEL}": field "supports": unknown level'
    elif breakage == "missing cert":
        cert.unlink()
        expected = f"TLS certificate {cert} not found"
    else:
        make_certificate(tmp_path / "..", "other")
        key.write_bytes((tmp_path / ".." / "other.key").read_bytes())
        expected = "does not belong to certificate"

    assert await proxy.service.reload() is False

    response, problem = await proxy.get_json(_path(study))
    assert response.code == 502 and "answered HTTP 500" in problem["detail"]  # old config
    assert any(expected in line and "running config kept" in line for line in _lines(events))
    metrics = (await proxy.get("/metrics"))[1].decode()
    assert 'zhiva_config_reloads_total{result="failed"} 1.0' in metrics


@pytest_twisted.ensureDeferred
async def test_sighup_reloads(setup, study, model_server):
    proxy, config, servers, models, _, events = setup
    models[MODEL]["uri"] = model_server.url + "/prediction"
    write_config(config, servers, models)

    os.kill(os.getpid(), signal.SIGHUP)
    while not any("reload: done" in line for line in _lines(events)):
        await deferLater(reactor, 0.05)

    response, _ = await proxy.get_json(_path(study))
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_request_in_flight_finishes_with_its_config(setup, study, model_server):
    proxy, config, servers, models, _, _ = setup
    running = ensureDeferred(proxy.get_json(_path(study, SLOW)))
    seq = (model_server.last() or {}).get("seq", 0)
    while (model_server.last() or {}).get("seq", 0) == seq:
        await deferLater(reactor, 0.05)

    del models[SLOW]
    write_config(config, servers, models)
    assert await proxy.service.reload() is True

    response, result = await running
    assert response.code == 200, result
    response, problem = await proxy.get_json(_path(study, SLOW))
    assert response.code == 404 and "no model" in problem["detail"]


@pytest_twisted.ensureDeferred
async def test_certificate_swap_reaches_the_next_connection(setup, tmp_path):
    proxy, _, _, _, (cert, key), _ = setup
    port = int(proxy.url.rsplit(":", 1)[1])
    before = await deferToThread(ssl.get_server_certificate, ("127.0.0.1", port))

    new_cert, new_key = make_certificate(tmp_path / "..", "renewed")
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())
    assert await proxy.service.reload() is True

    after = await deferToThread(ssl.get_server_certificate, ("127.0.0.1", port))
    assert ssl.PEM_cert_to_DER_cert(before) != ssl.PEM_cert_to_DER_cert(after)
    assert ssl.PEM_cert_to_DER_cert(after) == ssl.PEM_cert_to_DER_cert(new_cert.read_text())


@pytest_twisted.ensureDeferred
async def test_access_line_metrics_and_no_secrets(setup, study, model_server):
    proxy, config, servers, models, _, events = setup
    response, _ = await proxy.get_json(_path(study))  # fails: /fail500
    models[MODEL]["uri"] = model_server.url + "/prediction"
    write_config(config, servers, models)
    await proxy.service.reload()
    response, _ = await proxy.get_json(_path(study))
    assert response.code == 200
    request_id = response.headers.getRawHeaders("x-request-id")[0]

    access = [e for e in events if e.get("log_namespace") == "zhiva.access" and e.get("status")]
    ok = [e for e in access if e["request_id"] == request_id]
    assert len(ok) == 1
    line = formatEvent(ok[0])
    for field in (request_id, "predictions/series", f"model={MODEL}", f"server={SERVER}", "status=200",
                  "in=", "out=", "pacs=", "model=", "total="):
        assert field in line
    assert ok[0]["bytes_in"] > 0 and ok[0]["bytes_out"] > 0

    metrics = (await proxy.get("/metrics"))[1].decode()
    assert f'zhiva_requests_total{{kind="predictions",model="{MODEL}",status="200"}} 1.0' in metrics
    assert f'zhiva_requests_total{{kind="predictions",model="{MODEL}",status="502"}} 1.0' in metrics
    assert "zhiva_upstream_seconds_count{upstream=\"model\"}" in metrics
    assert "zhiva_reactor_lag_seconds" in metrics
    assert 'zhiva_relayed_bytes_total{direction="from_pacs"}' in metrics

    user, password = next(iter(AUTH_USERS.items()))
    basic = b64encode(f"{user}:{password}".encode()).decode()
    everything = "\n".join(_lines(events)) + metrics
    assert password not in everything and basic not in everything


@pytest_twisted.ensureDeferred
async def test_healthz_answers_without_upstreams(setup):
    proxy = setup[0]

    response, body = await proxy.get("/healthz")

    assert response.code == 200 and body == b"ok\n"


@pytest_twisted.ensureDeferred
async def test_graceful_stop_lets_a_request_in_flight_finish(setup, study, model_server):
    proxy = setup[0]
    running = ensureDeferred(proxy.get_json(_path(study, SLOW)))
    seq = (model_server.last() or {}).get("seq", 0)
    while (model_server.last() or {}).get("seq", 0) == seq:
        await deferLater(reactor, 0.05)

    stopping = proxy.service.stopService()
    await deferLater(reactor, 0.2)
    refused = []
    await proxy.client.get(proxy.url + "/healthz").addCallbacks(refused.append, refused.append)

    response, result = await running
    await stopping
    assert response.code == 200, result
    assert refused[0].check(ConnectionRefusedError), "a stopping proxy must not accept new connections"
    await proxy.pool.closeCachedConnections()


def test_check_config(tmp_path, capsys):
    servers = {SERVER: {"uri": "http://pacs/dicom-web", "isDefault": True}}
    models = {MODEL: {"uri": "http://model/x", "task": "prediction", "supports": ["/studies"]}}
    write_config(tmp_path, servers, models)
    cert, key = make_certificate(tmp_path)

    assert zhiva_cli(["check-config", str(tmp_path), "--cert", str(cert), "--key", str(key)]) == 0

    models[MODEL]["task"] = "guess"
    servers[SERVER]["uri"] = "pacs"
    write_config(tmp_path, servers, models)
    key.unlink()
    capsys.readouterr()
    assert zhiva_cli(["check-config", str(tmp_path), "--cert", str(cert), "--key", str(key)]) == 1
    errors = capsys.readouterr().err
    assert f'servers.json: entry "{SERVER}": field "uri"' in errors
    assert f'models.json: entry "{MODEL}": field "task"' in errors
    assert f"TLS private key {key} not found" in errors
    assert "3 problem(s) found" in errors


@pytest_twisted.ensureDeferred
async def test_reload_reindexes_a_folder_source(tmp_path, study, model_server):
    folder = tmp_path / "dicom"
    folder.mkdir()
    sops = study.series[study.small_series_uid]
    first, *rest = study.series_files(study.small_series_uid)
    shutil.copy(first, folder / first.name)
    config = write_config(
        tmp_path / "config",
        {SERVER: {"uri": folder.as_uri(), "isDefault": True}},
        {MODEL: {"uri": model_server.url + "/prediction", "task": "prediction",
                 "supports": ["/studies/series/instances"]}},
    )
    proxy = start_proxy(reactor, config, *make_certificate(tmp_path))
    path = f"/predictions/{MODEL}/studies/{study.study_uid}/series/{study.small_series_uid}/instances/{sops[-1]}"
    try:
        response, _ = await proxy.get_json(path)
        assert response.code == 404
        for path_ in rest:
            shutil.copy(path_, folder / path_.name)

        assert await proxy.service.reload() is True
        for _ in range(100):  # the index is rebuilt in a worker thread
            response, _ = await proxy.get_json(path)
            if response.code == 200:
                break
            await deferLater(reactor, 0.05)
        assert response.code == 200
    finally:
        await proxy.stop()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_log_dir_and_format(tmp_path, log_format):
    from twisted.logger import Logger, LogPublisher

    from zhiva.logs import observer_for

    publisher = LogPublisher(observer_for(log_format, str(tmp_path)))
    Logger(observer=publisher).info("hello {who}", who="admin")

    name = "zhiva.json.log" if log_format == "json" else "zhiva.log"
    text = (tmp_path / name).read_text()
    if log_format == "json":
        event = json.loads(text.strip().strip("\x1e"))
        assert event["who"] == "admin" and event["log_format"] == "hello {who}"
    else:
        assert text.rstrip().endswith("hello admin")
