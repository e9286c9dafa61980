"""
What every request passes before the resource tree sees it: HSTS, the URL
length cap, the origin allowlist (``--cors-origin``) and viewer
authentication (``--viewer-auth-keys``).
"""
from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request

from zhiva.errors import ProblemError, URITooLong
from zhiva.web import problem

HSTS = b"max-age=31536000"
#: Paths answered without a viewer token: Docker/load-balancer health and Prometheus.
OPEN_PATHS = frozenset({b"/healthz", b"/metrics"})


class Refused(Resource):
    """Answers ``error`` to any method; the tree below is never consulted."""

    isLeaf = True

    def __init__(self, error: ProblemError) -> None:
        super().__init__()
        self.error = error

    def render(self, request: Request) -> bytes:
        return problem.prepare(request, self.error)


def check(web, request: Request) -> ProblemError | None:
    """The problem that stops ``request`` before routing, or None; sets ``request.viewer``."""
    request.setHeader(b"Strict-Transport-Security", HSTS)
    request.viewer = None
    limits = web.limits
    if len(request.uri) > limits.max_url_length:
        return URITooLong(
            f"the request target is {len(request.uri)} bytes; this proxy takes {limits.max_url_length} "
            "at most (--max-url-length)"
        )
    if request.method == b"OPTIONS" or request.path in OPEN_PATHS:
        return None  # pre-flights answer their own refusal; health and metrics stay open
    # A browser sends a simple GET from any page without asking first: with an
    # allowlist, a page of another origin must not start inferences either.
    refused = web.cors.refusal(request)
    if refused is not None:
        return refused
    auth = web.viewer_auth
    if auth is None:
        return None
    try:
        request.viewer = auth.verify_header(request.getHeader(b"authorization"))
    except ProblemError as error:
        return error
    return None


def configure_channel(protocol, limits) -> None:
    """Twisted's own caps of the HTTP/1.1 channel: request line, each line, all headers."""
    channel = getattr(protocol, "_channel", protocol)
    channel.MAX_LENGTH = max(limits.max_url_length, 8192) + 1024
    channel.totalHeadersSize = limits.max_header_bytes + limits.max_url_length + 1024
