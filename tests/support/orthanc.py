"""
A real Orthanc (with its DICOMweb plugin) as a test PACS.

The proxy's PACS side is tested against the server hospitals actually run
rather than a fake, so multipart framing, auth and timing are genuine. Each
instance gets its own port and storage so test sessions never share state.
"""
from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

BINARY = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT = 30.0


def _free_port() -> int:
    """A loopback port free right now (Orthanc 1.10 cannot pick its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OrthancError(RuntimeError):
    """Orthanc failed to start or refused an upload."""


class Orthanc:
    """
    One Orthanc subprocess on 127.0.0.1, storage in a private temp directory
    removed by ``stop()``. ``users`` turns on HTTP basic auth.
    """

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.users = dict(users or {})
        self.port = 0
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        """None when Orthanc and its DICOMweb plugin are installed, else why not."""
        if shutil.which(BINARY) is None:
            return f"{BINARY} binary not on PATH (apt-get install orthanc)"
        if not DICOMWEB_PLUGIN.is_file():
            return f"{DICOMWEB_PLUGIN} missing (apt-get install orthanc-dicomweb)"
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    @property
    def log_path(self) -> Path:
        assert self._workdir is not None, "Orthanc not started"
        return self._workdir / "orthanc.log"

    def auth_header(self) -> dict[str, str]:
        """The Authorization header of the first configured user, if any."""
        if not self.users:
            return {}
        login, password = next(iter(self.users.items()))
        token = base64.b64encode(f"{login}:{password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {token}"}

    def _config(self) -> dict[str, object]:
        assert self._workdir is not None
        return {
            "Name": f"zhiva-test-{self.port}",
            "HttpPort": self.port,
            "StorageDirectory": str(self._workdir / "storage"),
            "IndexDirectory": str(self._workdir / "index"),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "DicomServerEnabled": False,
            # 1.10 listens on every interface; this makes it refuse non-loopback clients.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "HttpCompressionEnabled": False,
            "StorageCompression": False,
            "HttpThreadsCount": 16,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
        }

    def start(self) -> None:
        """Launch Orthanc and wait until ``/system`` answers (with auth if configured)."""
        self._workdir = Path(tempfile.mkdtemp(prefix="zhiva-orthanc-"))
        self.port = _free_port()
        config = self._workdir / "orthanc.json"
        config.write_text(json.dumps(self._config(), indent=2))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [BINARY, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
            )
        deadline = time.monotonic() + START_TIMEOUT
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._fail(f"Orthanc exited with status {self._process.returncode}")
            try:
                request = urllib.request.Request(self.url + "/system", headers=self.auth_header())
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError) as error:
                last_error = str(error)
            time.sleep(0.05)
        self._fail(f"Orthanc did not answer /system within {START_TIMEOUT:.0f} s ({last_error})")

    def _fail(self, reason: str) -> None:
        """Stop and raise with the log tail: a bare timeout says nothing about why."""
        tail = self.log_path.read_text(errors="replace").splitlines()[-30:]
        self.stop()
        raise OrthancError(reason + "; log tail:\n" + "\n".join(tail))

    def stop(self) -> None:
        """Terminate (kill if it lingers) and delete the storage."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def upload(self, paths: list[Path]) -> None:
        """Store Part 10 files through ``POST /instances``, one request per file."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/dicom", **self.auth_header()}
        try:
            for path in paths:
                connection.request("POST", "/instances", body=path.read_bytes(), headers=headers)
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    raise OrthancError(
                        f"upload of {path} answered {response.status}: {body[:300]!r}"
                    )
        finally:
            connection.close()

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
