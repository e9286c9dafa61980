"""
systemd ``Type=notify``: the real daemon (``twistd -n zhiva``) tells the
socket in ``$NOTIFY_SOCKET`` READY=1 once it listens, RELOADING=1/READY=1
around a SIGHUP reload (good or refused config) and STOPPING=1 on SIGTERM;
without the variable nothing is sent, and a bad socket never hurts.

No timing asserts: each datagram is waited for with a generous timeout.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from tests.support.proxy import free_port, make_certificate, start_proxy, write_config
from zhiva import sd_notify
from zhiva.sd_notify import Notifier, monotonic_usec

TWISTD = Path(sys.executable).parent / "twistd"
SERVER = "12121212-1212-4121-8121-121212121212"
MODEL = "cccccccc-0000-4000-8000-000000000001"
NEW = "cccccccc-0000-4000-8000-000000000002"
WAIT = 60.0  # seconds a datagram may take: generous, this is not a timing test


def _servers():
    return {SERVER: {"uri": "http://127.0.0.1:1/dicom-web", "isDefault": True}}


def _models(*keys: str):
    return {k: {"uri": "http://127.0.0.1:1/m", "task": "prediction", "supports": ["/studies"]} for k in keys}


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request):
    """A bound datagram socket like systemd's, and the NOTIFY_SOCKET value naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        # A short directory: AF_UNIX paths are limited to 107 bytes.
        with tempfile.TemporaryDirectory(prefix="zn-") as directory:
            path = os.path.join(directory, "notify")
            sock.bind(path)
            yield sock, path
            sock.close()
    else:
        name = f"zhiva-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        yield sock, "@" + name
        sock.close()


def _receive(sock: socket.socket) -> dict[str, str]:
    sock.settimeout(WAIT)
    data = sock.recv(65536).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if line)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(10)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(not TWISTD.exists(), reason="twistd is not installed beside this python")
def test_daemon_notifies_ready_reloading_and_stopping(tmp_path, notify_socket):
    sock, address = notify_socket
    config = write_config(tmp_path / "config", _servers(), _models(MODEL))
    make_certificate(config)
    port = free_port()
    output = (tmp_path / "twistd.out").open("w")
    daemon = subprocess.Popen(
        [str(TWISTD), "--nodaemon", "--pidfile=", "zhiva", "--listen",
         f"ssl:{port}:interface=127.0.0.1:privateKey=zhiva.key:certKey=zhiva.crt"],
        cwd=config, env={**os.environ, "NOTIFY_SOCKET": address},
        stdout=output, stderr=subprocess.STDOUT,
    )
    try:
        # Start: the first datagram is READY=1, and by then the port accepts.
        ready = _receive(sock)
        assert ready.get("READY") == "1", ready
        assert _accepts(port)  # at once, no retry: READY=1 came after listen()
        assert f"https://127.0.0.1:{port}" in ready["STATUS"]

        # A good reload: RELOADING=1 with the monotonic clock, then READY=1.
        write_config(config, _servers(), _models(MODEL, NEW))
        before = monotonic_usec()
        daemon.send_signal(signal.SIGHUP)
        reloading = _receive(sock)
        assert reloading.get("RELOADING") == "1", reloading
        assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
        done = _receive(sock)
        assert done.get("READY") == "1", done
        assert done["STATUS"].startswith("config reloaded")

        # A refused reload (broken models.json): the same pair, the STATUS says why.
        (config / "models.json").write_text('{"oops": ')
        daemon.send_signal(signal.SIGHUP)
        reloading = _receive(sock)
        assert reloading.get("RELOADING") == "1", reloading
        assert "MONOTONIC_USEC" in reloading
        refused = _receive(sock)
        assert refused.get("READY") == "1", refused
        assert "reload refused, running config kept" in refused["STATUS"]
        assert "models.json" in refused["STATUS"]
        assert daemon.poll() is None and _accepts(port)

        # Stop: STOPPING=1 as SIGTERM's graceful stop begins.
        daemon.send_signal(signal.SIGTERM)
        stopping = _receive(sock)
        assert stopping.get("STOPPING") == "1", stopping
        daemon.wait(WAIT)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(WAIT)
        output.close()

    log = (tmp_path / "twistd.out").read_text()
    assert daemon.returncode in (0, -signal.SIGTERM), log
    assert "Traceback" not in log and "NOTIFY_SOCKET" not in log  # no send failed


class _NoSocket:
    """Stands in for the socket module inside zhiva.sd_notify: any use fails the test."""

    AF_UNIX = SOCK_DGRAM = SOCK_CLOEXEC = 0

    def socket(self, *args, **kwargs):
        raise AssertionError("a notification socket was opened without NOTIFY_SOCKET")


def _warnings(events) -> list[str]:
    return [formatEvent(e) for e in events if "NOTIFY_SOCKET" in formatEvent(e)]


@pytest.fixture
def events():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest_twisted.ensureDeferred
async def test_without_notify_socket_nothing_is_attempted(tmp_path, monkeypatch, events):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setattr(sd_notify, "socket", _NoSocket())
    config = write_config(tmp_path / "config", _servers(), _models(MODEL))
    cert, key = make_certificate(tmp_path)

    assert Notifier.from_environment().notify("READY=1") is False
    proxy = start_proxy(reactor, config, cert, key)  # start, reload and stop: nothing sent
    try:
        assert proxy.service.notifier.address is None
        assert await proxy.service.reload() is True
    finally:
        await proxy.stop()
    assert _warnings(events) == []


@pytest.mark.parametrize(
    "address",
    ["/nonexistent-zhiva-dir/notify", f"@zhiva-nobody-{uuid.uuid4().hex}", "/" + "x" * 200, "/a\0b", "vsock:2:1"],
    ids=["missing path", "abstract nobody binds", "path too long", "NUL in path", "unsupported"],
)
def test_bad_socket_does_not_raise_and_warns_once(address, events):
    notifier = Notifier(address)

    assert notifier.notify("READY=1", "STATUS=listening") is False
    assert notifier.notify("STOPPING=1") is False

    (warning,) = _warnings(events)
    assert "failed" in warning


@pytest_twisted.ensureDeferred
async def test_daemon_with_a_missing_socket_runs_and_warns_once(tmp_path, monkeypatch, events):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens-here"))
    config = write_config(tmp_path / "config", _servers(), _models(MODEL))
    cert, key = make_certificate(tmp_path)

    proxy = start_proxy(reactor, config, cert, key)
    try:
        while not proxy.service.listening_on:  # READY=1 was attempted once it listened
            await deferLater(reactor, 0.05)
        response, body = await proxy.get("/healthz")
        assert response.code == 200
        assert await proxy.service.reload() is True
    finally:
        await proxy.stop()
    assert len(_warnings(events)) == 1


def test_a_full_socket_queue_drops_instead_of_blocking():
    with tempfile.TemporaryDirectory(prefix="zn-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
            receiver.bind(path)  # never read: its queue fills up
            notifier = Notifier(path)
            results: list[bool] = []

            def flood():
                for _ in range(100_000):
                    results.append(notifier.notify("STATUS=" + "x" * 1000))
                    if not results[-1]:
                        return

            sender = threading.Thread(target=flood, daemon=True)
            sender.start()
            sender.join(WAIT)
            assert not sender.is_alive(), "a notification blocked on a full queue"
            assert results and results[-1] is False


def test_monotonic_usec_is_clock_monotonic():
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= monotonic_usec() <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
