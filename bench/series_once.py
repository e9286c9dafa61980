"""
One series request through the real daemon, measured once: wall time seen
by the viewer and the proxy's peak RSS (VmHWM) before and after.

    .venv/bin/python bench/series_once.py [--slices 120]

Starts a real Orthanc with a generated CT series of 512x512 slices, the test
model API (it decodes zhiva-json as published model APIs do), and
``twistd -n zhiva``; then one ``curl`` for a series segmentation.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.dicomgen import make_study  # noqa: E402
from tests.support.model_server import ModelServer  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.proxy import free_port, make_certificate, write_config  # noqa: E402

SERVER = "11111111-1111-4111-8111-111111111111"
MODEL = "aaaaaaaa-0000-4000-8000-000000000001"


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def wait_for_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=120)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study = make_study(tmp / "study", big_slices=args.slices)
        series = study.big_series_uid
        megabytes = sum(p.stat().st_size for p in study.series_files(series)) / 1e6
        with Orthanc() as orthanc:
            orthanc.upload(study.files)
            (tmp / "model").mkdir()
            model = ModelServer(tmp / "model")
            model.start()
            try:
                config = write_config(
                    tmp / "config",
                    {SERVER: {"uri": orthanc.dicomweb, "isDefault": True}},
                    {MODEL: {"uri": model.url + "/segmentation", "task": "segmentation",
                             "supports": ["/studies/series"]}},
                )
                cert, key = make_certificate(tmp)
                port = free_port()
                twistd = Path(sys.executable).parent / "twistd"
                proxy = subprocess.Popen(
                    [str(twistd), "-n", "--pidfile=", "-l", str(tmp / "proxy.log"), "zhiva",
                     "--config-dir", str(config),
                     "--listen", f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"],
                )
                try:
                    wait_for_port(port)
                    idle = rss_kb(proxy.pid, "VmHWM")
                    url = f"https://127.0.0.1:{port}/segmentations/{MODEL}/studies/{study.study_uid}/series/{series}"
                    started = time.monotonic()
                    out = subprocess.run(
                        ["curl", "-sk", "-o", str(tmp / "result.json"), "-w", "%{http_code}", url],
                        capture_output=True, text=True, check=True,
                    )
                    wall = time.monotonic() - started
                    peak = rss_kb(proxy.pid, "VmHWM")
                    result = json.loads((tmp / "result.json").read_text())
                finally:
                    proxy.terminate()
                    proxy.wait(10)
            finally:
                model.stop()
    instances = len(result[study.study_uid][series])
    print(f"series: {args.slices} slices of 512x512 16-bit CT, {megabytes:.1f} MB of DICOM")
    print(f"HTTP {out.stdout}, {instances} instances in the result")
    print(f"wall time (viewer's curl, includes the model decoding zhiva-json): {wall:.2f} s")
    print(f"proxy peak RSS: idle {idle / 1024:.1f} MiB, after the request {peak / 1024:.1f} MiB "
          f"(+{(peak - idle) / 1024:.1f} MiB)")


if __name__ == "__main__":
    main()
