"""
A minimal model API speaking the ``dicom-multipart`` protocol of the zhiva
proxy (README, "dicom-multipart"). Standard library plus pydicom only.

    python examples/dicom_multipart_model.py --port 8011

and in models.json::

    {"<uuid>": {"uri": "http://127.0.0.1:8011/prediction", "task": "prediction",
                "supports": ["/studies", "/studies/series", "/studies/series/instances"],
                "protocol": "dicom-multipart"}}

It answers every POST with a prediction: the number of slices per series and
study. ``read_request`` is the part to copy: it turns the body into what a
zhiva-json model gets after decoding, i.e. a list of pydicom datasets, or
with data filters the SPEC.md structure ``{dataKey: {"data": ...}}`` with
datasets in place of instances. GET ``/last`` shows the latest request's
structure with SOPInstanceUIDs in place of datasets; GET ``/status`` is a
health check.
"""
from __future__ import annotations

import argparse
import email.message
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom


def split_multipart(body: bytes, boundary: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a ``multipart/related`` body: (headers, content) each."""
    delimiter = b"\r\n--" + boundary
    body = b"\r\n" + body  # so that a delimiter at the very start matches too
    parts = []
    pos = body.find(delimiter)
    while pos >= 0:
        pos += len(delimiter)
        if body[pos : pos + 2] == b"--":
            return parts  # close delimiter
        line_end = body.find(b"\r\n", pos)
        following = body.find(delimiter, line_end)
        if line_end < 0 or following < 0:
            break
        chunk = body[line_end + 2 : following]
        if chunk.startswith(b"\r\n"):
            head, content = b"", chunk[2:]
        else:
            head, _, content = chunk.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
        pos = following
    raise ValueError("multipart body without its close delimiter")


def read_request(content_type: str, body: bytes) -> Any:
    """
    The datasets of a dicom-multipart request: a list without data filters,
    the zhiva-json structure of SPEC.md with data filters.
    """
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/related":
        raise ValueError(f"expected multipart/related, got {content_type!r}")
    boundary = message.get_param("boundary")
    if not boundary:
        raise ValueError("no boundary in the Content-Type")
    parts = split_multipart(body, boundary.encode("latin-1"))
    plan = None
    if parts and parts[0][0].get("content-type", "").startswith("application/json"):
        plan = json.loads(parts.pop(0)[1])
    datasets = []
    by_fetch: dict[int, list] = {}
    for headers, content in parts:
        ds = pydicom.dcmread(BytesIO(content))
        datasets.append(ds)
        # Content-ID: <f{fetch}.i{ordinal}@zhiva>; parts come in order.
        fetch = int(headers.get("content-id", "<f0.").strip("<").split(".")[0][1:])
        by_fetch.setdefault(fetch, []).append(ds)
    if plan is None:
        return datasets

    def rebuild(node):
        if "fetch" in node and not isinstance(node["fetch"], dict):
            found = by_fetch.get(node["fetch"], [])
            if plan["fetches"][node["fetch"]]["single"]:
                return found[0]
            return found
        return {key: {"data": rebuild(entry["data"])} for key, entry in node.items()}

    return rebuild(plan["data"])


def all_datasets(inputs: Any) -> list:
    """Every dataset in a ``read_request`` result."""
    if isinstance(inputs, list):
        return inputs
    if isinstance(inputs, dict):
        return [ds for entry in inputs.values() for ds in all_datasets(entry["data"])]
    return [inputs]


def to_uids(inputs: Any) -> Any:
    """The same structure with each dataset replaced by its SOPInstanceUID."""
    if isinstance(inputs, list):
        return [str(ds.SOPInstanceUID) for ds in inputs]
    if isinstance(inputs, dict):
        return {key: {"data": to_uids(entry["data"])} for key, entry in inputs.items()}
    return str(inputs.SOPInstanceUID)


def predict(datasets: list) -> dict[str, Any]:
    """A valid prediction at any level: per instance, per series and per study counts."""

    def count(n: int) -> dict[str, Any]:
        return {"metadata": [{"dataType": "number", "value": n, "title": "Slices"}]}

    result: dict[str, Any] = {}
    for ds in datasets:
        series = result.setdefault(str(ds.StudyInstanceUID), {}).setdefault(
            str(ds.SeriesInstanceUID), {}
        )
        series[str(ds.SOPInstanceUID)] = count(1)
    for study in result.values():
        total = 0
        for series in study.values():
            total += len(series)
            series.update(count(len(series)))
        study.update(count(total))
    return result


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, value: Any) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        """The request body; the proxy sends it chunked (it streams)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_GET(self) -> None:
        if self.path == "/status":
            self._send(200, {"ok": True})
        elif self.path == "/last":
            self._send(200, self.server.last)
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = self._body()
        try:
            inputs = read_request(self.headers.get("Content-Type", ""), body)
            datasets = all_datasets(inputs)
            if not datasets:
                raise ValueError("no instance in the request")
        except Exception as error:  # a bad request is the proxy's bug: say why
            self._send(400, {"error": str(error)})
            return
        with self.server.lock:
            self.server.last = {"received": to_uids(inputs), "count": len(datasets)}
        self._send(200, predict(datasets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--portfile", type=Path, help="write the bound port here (for tests)")
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.lock = threading.Lock()
    server.last = None
    if args.portfile is not None:
        temporary = args.portfile.with_suffix(".tmp")
        temporary.write_text(str(server.server_address[1]))
        os.replace(temporary, args.portfile)
    server.serve_forever()


if __name__ == "__main__":
    main()
