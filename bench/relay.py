"""
The relay against its alternatives, in one run (issue 5). Not a test.

    /path/to/venv/bin/python bench/relay.py [--rounds 5] [--large 1000]

Needs Orthanc + orthanc-dicomweb (as the tests), curl, and the ``bench``
extra (``pip install '.[bench]'``: dicomweb-client). Starts a real Orthanc
holding a generated study (a 200-slice and a --large-slice series of 512x512
16-bit CT), a sink model API (reads the whole body without decoding it and
answers a valid prediction), and the proxy with ``twistd -n zhiva`` from this
checkout. Then, per series and alternating within each round, it measures:

- ``curl`` WADO-RS of the series from Orthanc to /dev/null (the wire);
- dicomweb-client ``retrieve_series`` (the usual Python client);
- the proxy end to end (a viewer's ``curl`` until the result) per protocol;

and prints the medians, the ratios of issue 5 point 5, the proxy's peak RSS
over idle while relaying the large series (per protocol, VmHWM reset between
runs), and the ``/healthz`` latency (p50/p99/max) while 4 large series relay
at once.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import listening, percentile, proc_kb, wait_for  # noqa: E402
from tests.support.dicomgen import _base_dataset, _write_series, make_study  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.proxy import free_port, make_certificate, write_config  # noqa: E402

SERVER = "11111111-1111-4111-8111-111111111111"
PROTOCOLS = ("zhiva-json", "dicom-multipart")
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


# --- the sink model API (its own process: python bench/relay.py --sink PORTFILE) ---


class Sink(BaseHTTPRequestHandler):
    """Reads the whole (chunked) body and answers a prediction for the query's UIDs."""

    protocol_version = "HTTP/1.1"
    wbufsize = -1  # the answer in one send, flushed when the handler returns

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(b'{"ok": true}')

    def do_POST(self) -> None:
        read = 0
        rfile = self.rfile
        scratch = memoryview(bytearray(1 << 20))  # readinto: no allocation per read
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                while size:  # discard without keeping: bounded memory
                    got = rfile.readinto(scratch[: min(size, 1 << 20)])
                    if not got:
                        raise ConnectionError("body cut short")
                    size -= got
                    read += got
                rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                got = rfile.readinto(scratch[: min(left, 1 << 20)])
                left -= got
                read += got
        query = parse_qs(urlsplit(self.path).query)
        study, series = query["study"][0], query["series"][0]
        count = {"metadata": [{"dataType": "number", "value": read, "title": "Bytes"}]}
        self._answer(json.dumps({study: {series: count, **count}}).encode())

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def run_sink(portfile: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    server.daemon_threads = True
    portfile.with_suffix(".tmp").write_text(str(server.server_address[1]))
    os.replace(portfile.with_suffix(".tmp"), portfile)
    server.serve_forever()


# --- helpers ---


def curl(url: str, *extra: str) -> float:
    """Seconds for one curl GET to /dev/null; raises unless HTTP 200."""
    started = time.perf_counter()
    done = subprocess.run(
        ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", *extra, url],
        capture_output=True, text=True, check=True,
    )
    elapsed = time.perf_counter() - started
    if done.stdout != "200":
        raise RuntimeError(f"{url} answered HTTP {done.stdout}")
    return elapsed


_RETRIEVE = """
import sys, time
from dicomweb_client.api import DICOMwebClient
client = DICOMwebClient(url=sys.argv[1])
started = time.perf_counter()
instances = client.retrieve_series(sys.argv[2], sys.argv[3])
elapsed = time.perf_counter() - started
assert instances, "dicomweb-client got no instance"
print(elapsed)
"""


def dicomweb_client_retrieve(base: str, study: str, series: str) -> float:
    """
    Seconds for ``retrieve_series`` alone, timed inside a fresh Python (as a
    script or a notebook would call it): in this long-lived harness, whose
    heap already held 525 MB series, it ran twice as fast as in any new
    process, a state no real client of a series is in.
    """
    done = subprocess.run(
        [sys.executable, "-c", _RETRIEVE, base, study, series], capture_output=True, text=True, check=True
    )
    return float(done.stdout)


class Health:
    """Polls /healthz over one kept-alive HTTPS connection, recording latencies."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        context = ssl._create_unverified_context()
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=30)
        while not self._stop.is_set():
            started = time.perf_counter()
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            response.read()
            self.latencies.append(time.perf_counter() - started)
            if response.status != 200:
                raise RuntimeError(f"/healthz answered {response.status}")
            time.sleep(0.01)
        connection.close()


# --- the run ---


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--small", type=int, default=200, help="slices of the first series")
    parser.add_argument("--large", type=int, default=1000, help="slices of the large series")
    parser.add_argument("--sink", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        run_sink(args.sink)
        return

    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="zhiva-bench-") as tmp, Orthanc() as orthanc:
        tmp = Path(tmp)
        try:
            run(args, tmp, orthanc, processes)
        finally:
            for process in processes:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()


def run(args, tmp: Path, orthanc: Orthanc, processes: list) -> None:
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    say(f"generating a {args.small}-slice and a {args.large}-slice 512x512 series ...")
    study = make_study(tmp / "study", big_slices=args.small, small_slices=1)
    large_uid = study.study_uid + ".3"
    _write_series(tmp / "study", _base_dataset(study.study_uid), large_uid, 3, args.large, 512, 512, study)
    series = {"small": study.big_series_uid, "large": large_uid}
    megabytes = {
        name: sum(p.stat().st_size for p in study.series_files(uid)) / 1e6 for name, uid in series.items()
    }
    say(f"uploading {len(study.files)} files to Orthanc ...")
    orthanc.upload(study.files)

    portfile = tmp / "sink.port"
    processes.append(subprocess.Popen([sys.executable, __file__, "--sink", str(portfile)]))
    wait_for(portfile.exists, "the sink model")
    sink = f"http://127.0.0.1:{int(portfile.read_text())}/predict"

    models = {}
    keys = {}
    for i, protocol in enumerate(PROTOCOLS):
        for j, (name, uid) in enumerate(series.items()):
            key = f"cccccccc-0000-4000-8000-{i:06d}{j:06d}"
            keys[protocol, name] = key
            models[key] = {
                "uri": f"{sink}?study={study.study_uid}&series={uid}",
                "task": "prediction",
                "supports": ["/studies/series"],
                "protocol": protocol,
                "timeout": 600,
            }
    config = write_config(tmp / "config", {SERVER: {"uri": orthanc.dicomweb, "isDefault": True}}, models)
    cert, key_file = make_certificate(tmp)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    twistd = Path(sys.executable).parent / "twistd"
    proxy = subprocess.Popen(
        [str(twistd), "-n", "--pidfile=", "-l", str(tmp / "proxy.log"), "zhiva",
         "--config-dir", str(config), "--no-coalescing",  # N identical requests: N relays
         "--listen", f"ssl:{port}:interface=127.0.0.1:privateKey={key_file}:certKey={cert}"],
        cwd=ROOT, env=env,
    )
    processes.append(proxy)
    wait_for(lambda: listening(port), "the proxy")
    proxy_url = f"https://127.0.0.1:{port}"
    curl(proxy_url + "/healthz")
    time.sleep(0.5)
    idle = proc_kb(proxy.pid, "VmRSS")  # started, no request relayed yet: the baseline

    def via_proxy(protocol: str, name: str) -> str:
        return f"{proxy_url}/predictions/{keys[protocol, name]}/studies/{study.study_uid}/series/{series[name]}"

    # Warm-up: one of each, so first-request costs (connections, imports) are not timed.
    for name in series:
        for protocol in PROTOCOLS:
            curl(via_proxy(protocol, name))
        curl(f"{orthanc.dicomweb}/studies/{study.study_uid}/series/{series[name]}", "-H", f"Accept: {ACCEPT}")

    ways = ["curl WADO-RS", "dicomweb-client retrieve_series"] + [f"proxy {p}" for p in PROTOCOLS]
    times: dict[tuple[str, str], list[float]] = {(w, n): [] for w in ways for n in series}
    for round_ in range(args.rounds):
        say(f"round {round_ + 1}/{args.rounds} ...")
        for name, uid in series.items():
            wado = f"{orthanc.dicomweb}/studies/{study.study_uid}/series/{uid}"
            times["curl WADO-RS", name].append(curl(wado, "-H", f"Accept: {ACCEPT}"))
            times["dicomweb-client retrieve_series", name].append(
                dicomweb_client_retrieve(orthanc.dicomweb, study.study_uid, uid)
            )
            for protocol in PROTOCOLS:
                times[f"proxy {protocol}", name].append(curl(via_proxy(protocol, name)))

    # Peak RSS (VmHWM, reset before each) over the idle RSS measured right after
    # start-up, per protocol, for the large series.
    rss = {}
    for protocol in PROTOCOLS:
        Path(f"/proc/{proxy.pid}/clear_refs").write_text("5")
        curl(via_proxy(protocol, "large"))
        rss[protocol] = (idle, proc_kb(proxy.pid, "VmHWM"))

    # /healthz while 4 large series relay at once, per protocol.
    health = {}
    for protocol in PROTOCOLS:
        Path(f"/proc/{proxy.pid}/clear_refs").write_text("5")
        with Health(port) as probe:
            threads = [threading.Thread(target=curl, args=(via_proxy(protocol, "large"),)) for _ in range(4)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
        health[protocol] = (probe.latencies, wall, proc_kb(proxy.pid, "VmHWM") - idle)

    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    print(f"Median of {args.rounds} alternating runs; series of 512x512 16-bit CT slices in a local Orthanc.")
    print()
    print("| way to get or forward the series | " + " | ".join(
        f"{n} ({len(study.series[series[n]])} slices, {megabytes[n]:.0f} MB): s | MB/s" for n in series) + " |")
    print("|---|" + "---:|---:|" * len(series))
    for way in ways:
        cells = " | ".join(f"{med[way, n]:.3f} | {megabytes[n] / med[way, n]:.0f}" for n in series)
        print(f"| {way} | {cells} |")
    print()
    print("| target (issue 5 point 5) | small series | large series | goal |")
    print("|---|---:|---:|---|")
    for label, a, b, goal in [
        ("proxy dicom-multipart / curl", "proxy dicom-multipart", "curl WADO-RS", 2.0),
        ("proxy zhiva-json / retrieve_series", "proxy zhiva-json", "dicomweb-client retrieve_series", 0.8),
        ("proxy dicom-multipart / retrieve_series", "proxy dicom-multipart", "dicomweb-client retrieve_series", 0.3),
    ]:
        ratios = [med[a, n] / med[b, n] for n in series]
        verdict = "met" if ratios[0] <= goal else "NOT met"
        print(f"| {label} | {ratios[0]:.2f} | {ratios[1]:.2f} | <= {goal} on the small series: {verdict} |")
    print()
    print(f"| proxy, {len(study.series[large_uid])}-slice series ({megabytes['large']:.0f} MB) "
          "| idle RSS | peak RSS | peak over idle (goal <= 64 MB) |")
    print("|---|---:|---:|---:|")
    for protocol, (idle, peak) in rss.items():
        print(f"| {protocol}, one request | {idle / 1024:.1f} MiB | {peak / 1024:.1f} MiB "
              f"| {(peak - idle) / 1024:.1f} MiB |")
    for protocol, (_, _, over) in health.items():
        print(f"| {protocol}, 4 concurrent requests | | | {over / 1024:.1f} MiB |")
    print()
    print("| /healthz while 4 large series relay at once | polls | p50 | p99 | max | relay wall time |")
    print("|---|---:|---:|---:|---:|---:|")
    for protocol, (latencies, wall, _) in health.items():
        print(f"| {protocol} | {len(latencies)} | {percentile(latencies, 50) * 1e3:.1f} ms "
              f"| {percentile(latencies, 99) * 1e3:.1f} ms | {max(latencies) * 1e3:.1f} ms | {wall:.2f} s |")


if __name__ == "__main__":
    main()
