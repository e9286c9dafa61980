"""CORS: the viewer is a web app served from another origin."""
from __future__ import annotations

from twisted.web.server import Request

from zhiva.errors import Forbidden
from zhiva.web import problem

ALLOW_HEADERS = b"Authorization, Accept, Content-Type"
EXPOSE_HEADERS = b"X-Request-Id"


class CORSPolicy:
    def __init__(self, origins: tuple[str, ...] = ("*",)) -> None:
        self._any = "*" in origins
        self._origins = frozenset(o.rstrip("/") for o in origins)

    def apply(self, request: Request) -> None:
        """Headers every answer carries, errors included."""
        origin = request.getHeader(b"origin")
        if self._any:
            request.setHeader(b"Access-Control-Allow-Origin", b"*")
        elif origin is not None and origin.decode("latin-1") in self._origins:
            request.setHeader(b"Access-Control-Allow-Origin", origin)
            # Credentials only for a listed origin, never with "*".
            request.setHeader(b"Access-Control-Allow-Credentials", b"true")
            request.setHeader(b"Vary", b"Origin")
        else:
            request.setHeader(b"Vary", b"Origin")
            return
        request.setHeader(b"Access-Control-Expose-Headers", EXPOSE_HEADERS)

    def allows(self, request: Request) -> bool:
        """False for a browser request from an origin off the ``--cors-origin`` list."""
        origin = request.getHeader(b"origin")
        return self._any or origin is None or origin.decode("latin-1") in self._origins

    def refusal(self, request: Request) -> Forbidden | None:
        """The 403 for a request from an origin off the list; None when it may go on."""
        if self.allows(request):
            return None
        shown = request.getHeader(b"origin").decode("latin-1")[:100]
        return Forbidden(f"origin {shown!r} is not allowed (--cors-origin)")

    def preflight(self, request: Request, methods: bytes) -> bytes:
        refused = self.refusal(request)
        if refused is not None:
            return problem.prepare(request, refused)
        request.setResponseCode(204)
        request.setHeader(b"Access-Control-Allow-Methods", methods)
        request.setHeader(b"Access-Control-Allow-Headers", ALLOW_HEADERS)
        request.setHeader(b"Access-Control-Max-Age", b"600")
        request.setHeader(b"Allow", methods)
        return b""
