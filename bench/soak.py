"""
Soak: N concurrent viewers for a while against the real daemon, a real
Orthanc and the test model API, mixing instance, series and study requests
with some that fail upstream (model 500, PACS down, unknown study).

    .venv/bin/python bench/soak.py [--clients 16] [--seconds 180]

Prints requests served, answers by status and kind, p50/p99 latency per kind,
and the proxy's RSS at start and end (VmRSS) and its peak (VmHWM).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import listening, percentile, proc_kb, wait_for  # noqa: E402
from tests.support.dicomgen import make_study  # noqa: E402
from tests.support.model_server import ModelServer  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.proxy import free_port, make_certificate, write_config  # noqa: E402

SERVER = "11111111-1111-4111-8111-111111111111"
DOWN = "44444444-4444-4444-8444-444444444444"
MODEL = "aaaaaaaa-0000-4000-8000-000000000003"
FAILING = "aaaaaaaa-0000-4000-8000-000000000008"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--slices", type=int, default=40, help="slices of the big series (256x256)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study = make_study(tmp / "study", big_slices=args.slices, rows=256, cols=256)
        big, small = study.big_series_uid, study.small_series_uid
        with Orthanc() as orthanc:
            orthanc.upload(study.files)
            (tmp / "model").mkdir()
            model = ModelServer(tmp / "model")
            model.start()
            try:
                levels = ["/studies", "/studies/series", "/studies/series/instances"]
                config = write_config(
                    tmp / "config",
                    {SERVER: {"uri": orthanc.dicomweb, "isDefault": True},
                     DOWN: {"uri": f"http://127.0.0.1:{free_port()}/dicom-web", "timeout": 5}},
                    {MODEL: {"uri": model.url + "/prediction", "task": "prediction", "supports": levels},
                     FAILING: {"uri": model.url + "/fail500", "task": "prediction", "supports": levels}},
                )
                cert, key = make_certificate(tmp)
                port = free_port()
                twistd = Path(sys.executable).parent / "twistd"
                proxy = subprocess.Popen(
                    [str(twistd), "-n", "--pidfile=", "-l", str(tmp / "proxy.log"), "zhiva",
                     "--config-dir", str(config), "--no-coalescing",  # N identical requests: N relays
                     "--listen", f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"],
                    cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's zhiva
                )
                try:
                    wait_for(lambda: listening(port), "the proxy")
                    stats = run(port, study, big, small, args)
                finally:
                    proxy.terminate()
                    proxy.wait(30)
            finally:
                model.stop()
    report(stats, args)


def run(port, study, big, small, args):
    base = f"/predictions/{MODEL}/studies/{study.study_uid}"
    kinds = [
        # (kind, weight, path maker)
        ("instance", 45, lambda: f"{base}/series/{big}/instances/{random.choice(study.series[big])}"),
        ("series-small", 20, lambda: f"{base}/series/{small}"),
        ("series-big", 10, lambda: f"{base}/series/{big}"),
        ("study", 5, lambda: base),
        ("fail-model-500", 8, lambda: f"/predictions/{FAILING}/studies/{study.study_uid}/series/{small}"),
        ("fail-pacs-down", 4, lambda: f"{base}/series/{small}?server={DOWN}"),
        ("fail-unknown-study", 8, lambda: f"/predictions/{MODEL}/studies/1.2.3.999"),
    ]
    weights = [k[1] for k in kinds]
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    lock = threading.Lock()
    latencies: dict[str, list[float]] = defaultdict(list)
    outcomes: Counter = Counter()
    details: Counter = Counter()  # what went wrong where success was due
    pid = proxy_pid(port)
    rss_start = proc_kb(pid, "VmRSS")
    deadline = time.monotonic() + args.seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=120)
        while time.monotonic() < deadline:
            kind, _, make = rng.choices(kinds, weights)[0]
            started = time.monotonic()
            detail = ""
            try:
                connection.request("GET", make())
                response = connection.getresponse()
                body = response.read()
                status = response.status
                label = f"{status}"
                if status != 200:
                    problem = json.loads(body)
                    label += " " + problem["title"]
                    detail = problem.get("detail", "")
            except Exception as e:  # noqa: BLE001 - counted by kind
                label = f"client error {type(e).__name__}"
                detail = str(e)
                connection.close()
                connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=120)
            elapsed = time.monotonic() - started
            with lock:
                latencies[kind].append(elapsed)
                outcomes[(kind, label)] += 1
                if not kind.startswith("fail") and not label.startswith("200"):
                    details[f"{kind}: {label}: {detail}"] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    return {
        "latencies": latencies, "outcomes": outcomes, "wall": wall, "details": details,
        "rss_start": rss_start, "rss_end": proc_kb(pid, "VmRSS"), "rss_peak": proc_kb(pid, "VmHWM"),
    }


def proxy_pid(port: int) -> int:
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(out.split("pid=", 1)[1].split(",", 1)[0])


def report(stats, args) -> None:
    outcomes, latencies = stats["outcomes"], stats["latencies"]
    total = sum(outcomes.values())
    print(f"{args.clients} clients for {stats['wall']:.0f} s: {total} requests, {total / stats['wall']:.1f}/s")
    print("answers by kind and status:")
    for (kind, label), count in sorted(outcomes.items()):
        print(f"  {kind:20s} {label:28s} {count:6d}")
    unexpected = sum(c for (kind, label), c in outcomes.items()
                     if (kind.startswith("fail") and label.startswith("200")) or
                     (not kind.startswith("fail") and not label.startswith("200")))
    print(f"unexpected answers (a failure where success was due or the reverse): {unexpected}")
    for text, count in stats["details"].most_common(10):
        print(f"  {count:4d} x {text[:300]}")
    print("latency by kind (s): p50 / p99")
    for kind, values in sorted(latencies.items()):
        print(f"  {kind:20s} {percentile(values, 50):7.3f} / {percentile(values, 99):7.3f}  (n={len(values)})")
    every = [v for values in latencies.values() for v in values]
    print(f"  {'all':20s} {percentile(every, 50):7.3f} / {percentile(every, 99):7.3f}")
    print(f"proxy RSS: start {stats['rss_start'] / 1024:.1f} MiB, end {stats['rss_end'] / 1024:.1f} MiB, "
          f"peak {stats['rss_peak'] / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
