"""
The real daemon, ``twistd -n zhiva``, as an admin starts it: help, the
one-line start-up errors, and a first answer over HTTPS.
"""
from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.proxy import free_port, make_certificate, write_config

TWISTD = Path(sys.executable).parent / "twistd"
SERVER = "11111111-1111-4111-8111-111111111111"
MODEL = "aaaaaaaa-0000-4000-8000-000000000001"

pytestmark = pytest.mark.skipif(not TWISTD.exists(), reason="twistd is not installed beside this python")


def twistd(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TWISTD), "--nodaemon", "--pidfile=", "zhiva", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def config(tmp_path):
    return write_config(
        tmp_path,
        {SERVER: {"uri": "http://127.0.0.1:1/dicom-web", "isDefault": True}},
        {MODEL: {"uri": "http://127.0.0.1:1/m", "task": "prediction", "supports": ["/studies"]}},
    )


def test_help_lists_the_options(tmp_path):
    result = twistd("--help", cwd=tmp_path)

    assert result.returncode == 0
    for option in ("--config-dir", "--listen", "--status-page", "--cors-origin"):
        assert option in result.stdout


def test_missing_certificate_is_one_line_with_the_fix(config):
    result = twistd(cwd=config)

    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert str(config / "zhiva.crt") in line
    assert "openssl req -x509" in line


def test_bad_config_names_file_entry_and_field(config):
    make_certificate(config)
    models = json.loads((config / "models.json").read_text())
    models[MODEL]["task"] = "segment"
    (config / "models.json").write_text(json.dumps(models))

    result = twistd(cwd=config)

    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert f'models.json: entry "{MODEL}": field "task"' in line


def test_unreadable_config_is_one_line(config):
    make_certificate(config)
    (config / "servers.json").write_text("{not json")

    result = twistd(cwd=config)

    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "servers.json" in line and "not valid JSON" in line


def test_daemon_serves_https_with_problem_json(config):
    cert, _ = make_certificate(config)
    port = free_port()
    daemon = subprocess.Popen(
        [str(TWISTD), "--nodaemon", "--pidfile=", "zhiva", "--listen",
         f"ssl:{port}:interface=127.0.0.1:privateKey=zhiva.key:certKey=zhiva.crt"],
        cwd=config, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    context = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"https://localhost:{port}/nothing", context=context, timeout=5)
            except urllib.error.HTTPError as e:
                answer = e
                break
            except OSError:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise
                time.sleep(0.2)
    finally:
        daemon.terminate()
        output = daemon.communicate(timeout=15)[0]

    assert answer.code == 404
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert json.loads(answer.read())["status"] == 404
    assert "Traceback" not in output


def test_a_port_in_use_stops_start_up_in_one_line(config):
    """Without this, twistd logged a traceback and ran on, serving nothing."""
    make_certificate(config)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = twistd("--listen", f"ssl:{port}:privateKey=zhiva.key:certKey=zhiva.crt", cwd=config)

    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert f"zhiva: cannot listen on all interfaces port {port}: [Errno 98] Address already in use" in output
    assert "Traceback" not in output
