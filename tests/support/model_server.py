"""
A real model API over HTTP, speaking zhiva-json like the published ones.

Run as a script (``python model_server.py --port 0 --portfile FILE``) it serves
on 127.0.0.1 in its own process, so the proxy under test talks to it over
genuine sockets with no help from the test's reactor. It decodes each
instance exactly as existing model APIs do
(``pydicom.dcmread(BytesIO(bytes(json.loads(item))))``) and so rejects
anything they would reject. ``ModelServer`` launches it for fixtures.

POST routes: ``/segmentation``, ``/annotation``, ``/prediction`` (``?double=1``
answers double-encoded like FastAPI ORJSONResponse models), ``/fail500``,
``/nonjson``, ``/badshape``, ``/slow?seconds=N``, ``/hold?name=X`` (answers
a prediction once GET ``/release?name=X`` was called: a test decides when a
model call ends, without timing). GET ``/last`` reports what the latest POST
carried, GET ``/status`` answers ``{"ok": true}``.
A ``multipart/related`` POST is decoded as ``dicom-multipart`` (README) instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom

if __name__ == "__main__":  # run as a script: use this checkout's zhiva, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

Uids = tuple[str, str, str]  # study, series, SOP instance

SEGMENT = {"points": [[0, 1], [1, 0]], "color": "#ff0000", "className": "lung"}
ROI = {"points": [[1, 2], [3, 4], [5, 6]], "color": "#00ff00", "className": "nodule"}
#: POST path -> the task whose result it answers with.
TASKS = {
    "/segmentation": "segmentation",
    "/annotation": "annotation",
    "/prediction": "prediction",
    "/slow": "prediction",
    "/hold": "prediction",
}
#: Longest a /hold call waits for its /release.
HOLD_LIMIT = 60.0


class BadBody(Exception):
    """The body is not zhiva-json a published model API could decode."""


def _number(count: int) -> dict[str, Any]:
    return {"metadata": [{"dataType": "number", "value": count, "title": "Slices"}]}


def decode_instance(item: object, uids: list[Uids]) -> str:
    """Decode one zhiva-json instance string, note its UIDs, return its SOPInstanceUID."""
    if not isinstance(item, str):
        raise BadBody(f"instance must be a JSON string, got {type(item).__name__}")
    try:
        ds = pydicom.dcmread(BytesIO(bytes(json.loads(item))))
        found = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    except Exception as error:  # whatever pydicom or json raise, a real model would crash
        raise BadBody(f"undecodable instance: {error!r}") from error
    uids.append(found)
    return found[2]


def decode_body(body: bytes, uids: list[Uids]) -> Any:
    """
    Decode the documented body shapes (plain list; study-level filter with a
    list or a nested object under ``data``; series-level filter) and return
    the same structure with each instance replaced by its SOPInstanceUID.
    """
    try:
        parsed = json.loads(body)
    except ValueError as error:
        raise BadBody(f"body is not JSON: {error}") from error
    if isinstance(parsed, list):
        return [decode_instance(item, uids) for item in parsed]
    if not isinstance(parsed, dict):
        raise BadBody("body must be a JSON array or object")
    keys: dict[str, Any] = {}
    for key, entry in parsed.items():
        if not isinstance(entry, dict) or set(entry) != {"data"}:
            raise BadBody(f"{key!r} must be an object with exactly a 'data' key")
        data = entry["data"]
        if isinstance(data, list):
            keys[key] = {"data": [decode_instance(item, uids) for item in data]}
        elif isinstance(data, dict):
            nested: dict[str, Any] = {}
            for inner, inner_entry in data.items():
                if not isinstance(inner_entry, dict) or set(inner_entry) != {"data"}:
                    raise BadBody(f"{key!r}/{inner!r} must be an object with exactly a 'data' key")
                nested[inner] = {"data": decode_instance(inner_entry["data"], uids)}
            keys[key] = {"data": nested}
        else:
            keys[key] = {"data": decode_instance(data, uids)}
    return keys


def decode_multipart(body: bytes, content_type: str, uids: list[Uids]) -> Any:
    """
    Decode a ``dicom-multipart`` body (README) with our streaming parser and
    return the zhiva-json-like structure of SOPInstanceUIDs that
    ``decode_body`` returns, rebuilt from the leading JSON part and the
    ``Content-ID: <fN.iM@zhiva>`` of each DICOM part.
    """
    from zhiva.multipart import MultipartError, MultipartParser, parse_content_type

    media, params = parse_content_type(content_type)
    if media != "multipart/related" or params.get("type") != "application/dicom":
        raise BadBody(f"unexpected Content-Type {content_type!r}")
    parts: list[tuple[dict[str, str], list[bytes]]] = []
    parser = MultipartParser(
        params.get("boundary", "").encode("latin-1"),
        lambda headers: parts.append((headers, [])),
        lambda data: parts[-1][1].append(data),
        lambda: None,
    )
    try:
        parser.feed(body)
        parser.close()
    except MultipartError as error:
        raise BadBody(f"bad multipart body: {error}") from error
    plan = None
    if parts and parts[0][0].get("content-type") == "application/json":
        plan = json.loads(b"".join(parts.pop(0)[1]))
    by_fetch: dict[int, list[str]] = {}
    for headers, chunks in parts:
        if headers.get("content-type") != "application/dicom":
            raise BadBody(f"part of type {headers.get('content-type')!r}")
        try:
            ds = pydicom.dcmread(BytesIO(b"".join(chunks)))
            found = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        except Exception as error:
            raise BadBody(f"undecodable instance: {error!r}") from error
        uids.append(found)
        sop = found[2]
        fetch, ordinal = headers.get("content-id", "<f0.i0@zhiva>").strip("<>").split("@")[0].split(".")
        sops = by_fetch.setdefault(int(fetch[1:]), [])
        if int(ordinal[1:]) != len(sops):
            raise BadBody(f"part {headers.get('content-id')} out of order")
        sops.append(sop)
    if plan is None:
        return [sop for _, _, sop in uids]

    def rebuild(node: dict[str, Any]) -> Any:
        if isinstance(node.get("fetch"), int):
            found = by_fetch.get(node["fetch"], [])
            return found[0] if plan["fetches"][node["fetch"]]["single"] else found
        return {key: {"data": rebuild(entry["data"])} for key, entry in node.items()}

    return rebuild(plan["data"])


def build_result(task: str, uids: list[Uids]) -> dict[str, Any]:
    """A valid result of ``task`` covering every received instance."""
    result: dict[str, Any] = {}
    for study, series, sop in uids:
        series_node = result.setdefault(study, {}).setdefault(series, {})
        if task == "segmentation":
            series_node[sop] = {"segments": [SEGMENT]}
        elif task == "annotation":
            series_node[sop] = {"rois": [ROI]}
        else:
            series_node[sop] = _number(1)
    if task == "prediction":
        for study_node in result.values():
            total = 0
            for series_node in study_node.values():
                total += len(series_node)
                series_node.update(_number(len(series_node)))
            study_node.update(_number(total))
    return result


class Handler(BaseHTTPRequestHandler):
    """One request; HTTP/1.1 so a client's persistent connections are honoured."""

    protocol_version = "HTTP/1.1"
    server: ModelHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silence access logs; tracebacks still reach stderr."""

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode())

    def _read_body(self) -> bytes | None:
        """The request body, de-chunked; None (after answering 411) if unframed."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            self._send(411, b"Content-Length or chunked body required", "text/plain")
            return None
        return self.rfile.read(int(length))

    def handle(self) -> None:
        """A client hanging up mid-answer (the proxy timing out) is not our error."""
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/status":
            self._send_json(200, {"ok": True})
        elif path == "/last":
            with self.server.lock:
                last = self.server.last
            self._send_json(200, last)
        elif path == "/release":
            self.server.hold(parse_qs(urlsplit(self.path).query).get("name", [""])[0]).set()
            self._send_json(200, {"released": True})
        else:
            self._send(404, b"not found", "text/plain")

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        body = self._read_body()
        if body is None:
            return
        uids: list[Uids] = []
        error: str | None = None
        keys: Any = None
        try:
            content_type = self.headers.get("Content-Type", "")
            if content_type.startswith("multipart/related"):
                keys = decode_multipart(body, content_type, uids)
            else:
                keys = decode_body(body, uids)
            if not uids:
                raise BadBody("no instance in the body")
        except BadBody as failure:
            error = str(failure)
        with self.server.lock:
            self.server.seq += 1
            self.server.last = {
                "seq": self.server.seq,
                "path": url.path,
                "query": url.query,
                "sops": [sop for _, _, sop in uids],
                "keys": keys,
                "content_type": self.headers.get("Content-Type"),
                "transfer_encoding": self.headers.get("Transfer-Encoding"),
                "body_bytes": len(body),
                "count": len(uids),
                "error": error,
            }
        if error is not None:
            self._send(500, f"Internal Server Error: {error}".encode(), "text/plain")
            return
        self._answer(url.path, query, uids)

    def _answer(self, path: str, query: dict[str, list[str]], uids: list[Uids]) -> None:
        if path in TASKS:
            if path == "/slow":
                time.sleep(float(query.get("seconds", ["1"])[0]))
            if path == "/hold":
                self.server.hold(query.get("name", [""])[0]).wait(HOLD_LIMIT)
            result = build_result(TASKS[path], uids)
            payload = json.dumps(result)
            if query.get("double") == ["1"]:
                payload = json.dumps(payload)
            self._send(200, payload.encode())
        elif path == "/fail500":
            self._send(500, b"Internal Server Error", "text/plain")
        elif path == "/nonjson":
            self._send(200, b"<html>oops</html>", "text/html")
        elif path == "/badshape":
            self._send_json(200, {"not-a-uid": 1})
        else:
            self._send(404, b"not found", "text/plain")


class ModelHTTPServer(ThreadingHTTPServer):
    """Holds the record of the latest POST, shared by the handler threads."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.lock = threading.Lock()
        self.seq = 0
        self.last: dict[str, Any] | None = None
        self._holds: dict[str, threading.Event] = {}

    def hold(self, name: str) -> threading.Event:
        with self.lock:
            return self._holds.setdefault(name, threading.Event())


class ModelServer:
    """Runs this script as a subprocess for fixtures, outside any reactor."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Launch and wait for the port file, then for ``/status``."""
        portfile = self.workdir / "model_server.port"
        portfile.unlink(missing_ok=True)
        self._process = subprocess.Popen(
            [sys.executable, __file__, "--port", "0", "--portfile", str(portfile)],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not portfile.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("model server did not start (see its stderr above)")
            time.sleep(0.05)
        self.port = int(portfile.read_text())
        with urllib.request.urlopen(self.url + "/status", timeout=timeout) as response:
            assert json.load(response) == {"ok": True}

    def last(self) -> dict[str, Any] | None:
        """What the latest POST carried (see ``Handler.do_POST``), None before any."""
        with urllib.request.urlopen(self.url + "/last", timeout=10) as response:
            return json.load(response)

    def release(self, name: str) -> None:
        """Let every ``/hold?name=NAME`` call answer, now and later."""
        with urllib.request.urlopen(f"{self.url}/release?name={name}", timeout=10) as response:
            response.read()

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--portfile", type=Path, required=True)
    args = parser.parse_args()
    server = ModelHTTPServer(args.port)
    # Write then rename, so a poller never reads a half-written port.
    temporary = args.portfile.with_suffix(".tmp")
    temporary.write_text(str(server.server_address[1]))
    os.replace(temporary, args.portfile)
    server.serve_forever()


if __name__ == "__main__":
    main()
