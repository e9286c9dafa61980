"""``/healthz`` for Docker and load balancers, ``/metrics`` for Prometheus."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.server import Request

from zhiva.web.resources import Node


class Health(Node):
    """200 while the reactor turns; touches no upstream."""

    methods = (b"GET",)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return b"ok\n"


class MetricsPage(Node):
    methods = (b"GET",)

    def __init__(self, app, registry) -> None:
        super().__init__(app)
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)
