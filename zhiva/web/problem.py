"""
Every error the viewer sees is RFC 7807 ``application/problem+json``; this is
the one place that renders them.
"""
from __future__ import annotations

import json

from twisted.logger import Logger
from twisted.web.server import Request

from zhiva.errors import ProblemError

log = Logger()
CONTENT_TYPE = b"application/problem+json"


def body(error: ProblemError, instance: str | None = None) -> bytes:
    problem = {
        "type": error.type,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
    }
    if instance:
        problem["instance"] = instance
    return json.dumps(problem).encode("utf-8")


def prepare(request: Request, error: ProblemError) -> bytes:
    """Set status and headers for ``error``; return the body to write."""
    request.setResponseCode(error.status)
    request.setHeader(b"Content-Type", CONTENT_TYPE)
    request.setHeader(b"Cache-Control", b"no-store")
    for name, value in error.headers.items():
        request.setHeader(name, value)
    data = body(error, getattr(request, "request_id", None))
    request.setHeader(b"Content-Length", b"%d" % len(data))
    return data


def send(request: Request, error: ProblemError) -> None:
    """Answer a request that went async. If the answer has begun, cut it off."""
    if request.finished or request._disconnected:
        return
    if request.startedWriting:
        request.transport.abortConnection()
        return
    request.write(prepare(request, error))
    request.finish()
