"""
What can be checked of the Docker and systemd packaging without a Docker
engine or a running systemd: the compose file keeps the original contract,
and the image's own commands (its CMD and HEALTHCHECK, read from the
Dockerfile) work against the real entry point, including reload by SIGHUP.
"""
from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.proxy import make_certificate

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _dockerfile() -> dict[str, str]:
    """Instruction -> its (last) argument, with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            found[instruction.upper()] = rest.strip()
    return found


def test_compose_keeps_the_original_contract():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    (service,) = compose["services"].values()

    assert "8002:8002" in service["ports"]
    assert service["restart"] == "unless-stopped"
    assert "ZHIVA_SHOW_STATUS_PAGE" in service["environment"]
    mounts = {v.split(":")[0] for v in service["volumes"]}
    assert {"./zhiva.crt", "./zhiva.key", "./servers.json", "./models.json", "./log"} <= mounts
    assert set(service["networks"]) == {"pacs-shared-network", "model-shared-network"}
    assert set(compose["networks"]) == {"pacs-shared-network", "model-shared-network"}


def test_dockerfile_is_slim_non_root_with_healthcheck():
    docker = _dockerfile()

    assert docker["FROM"].startswith("python:3.11-slim")
    assert docker["USER"] not in ("root", "0")
    assert "zhiva" in docker["HEALTHCHECK"] and "/healthz" in docker["HEALTHCHECK"]
    assert "getPlugins" in (ROOT / "Dockerfile").read_text()  # dropin.cache regenerated
    assert "8002" in docker["EXPOSE"]


def test_systemd_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "etc" / "zhiva.service")
    service = unit["Service"]

    assert "twistd --nodaemon" in service["ExecStart"] and " zhiva " in service["ExecStart"]
    assert "check-config" in service["ExecStartPre"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # sd_notify READY/RELOADING/STOPPING (tests/test_sd_notify.py); notify-reload needs systemd 253,
    # Debian 12 has 252.
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["User"] == "zhiva"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] and service["LogsDirectory"]
    for config in ("servers.json", "models.json"):
        json.loads((ROOT / "etc" / "zhiva" / config).read_text())
    analyze = shutil.which("systemd-analyze")
    if analyze:
        result = subprocess.run([analyze, "verify", str(ROOT / "etc" / "zhiva.service")],
                                capture_output=True, text=True)
        # The binaries under /opt/zhiva do not exist here; syntax errors would show otherwise.
        assert "Unknown key" not in result.stderr and "Invalid" not in result.stderr, result.stderr


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.skipif(not (BIN / "zhiva").exists(), reason="the zhiva console script is not installed")
def test_image_commands_run_against_the_entry_point(tmp_path):
    if not _port_free(8002):
        pytest.skip("port 8002 is busy; the image's CMD listens there")
    for name in ("servers.json", "models.json"):
        shutil.copy(ROOT / name, tmp_path / name)
    make_certificate(tmp_path)
    (tmp_path / "log").mkdir()
    state = tmp_path / "state"
    docker = _dockerfile()
    cmd = json.loads(docker["CMD"])
    cmd[-1] = cmd[-1].replace("/var/lib/zhiva", str(state))
    health = json.loads(docker["HEALTHCHECK"].split("CMD", 1)[1])
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}

    container = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(health, env=env, capture_output=True).returncode != 0:
            assert container.poll() is None, "the image's CMD exited"
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(0.3)
        os.kill(container.pid, signal.SIGHUP)  # docker compose kill -s HUP
        log = tmp_path / "log" / "zhiva.log"
        while "reload: done" not in log.read_text():
            assert time.monotonic() < deadline, "no reload after SIGHUP"
            time.sleep(0.2)
    finally:
        os.kill(container.pid, signal.SIGTERM)  # docker stop
        container.wait(30)

    # twistd stops cleanly, then re-raises SIGTERM so the parent sees why it ended.
    assert container.returncode in (0, -signal.SIGTERM)
    lines = log.read_text().splitlines()
    assert any(line.endswith("zhiva.service.ZhivaService#info] stopped") for line in lines)
    assert lines[-1].endswith("Server Shut Down.")  # the last line is whole


def test_image_refuses_a_broken_config_before_start(tmp_path):
    if not (BIN / "zhiva").exists():
        pytest.skip("the zhiva console script is not installed")
    (tmp_path / "servers.json").write_text("{}")
    (tmp_path / "models.json").write_text('{"x": {}}')
    make_certificate(tmp_path)
    cmd = json.loads(_dockerfile()["CMD"])
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}

    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert 'models.json: entry "x"' in result.stderr
