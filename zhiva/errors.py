"""
Typed errors that the web layer maps to RFC 7807 problem+json answers.

Raised anywhere below the web layer; ``zhiva.web.problem`` renders them in one
place. ``detail`` is shown to the viewer: it never holds a secret.
"""
from __future__ import annotations


class ProblemError(Exception):
    status = 500
    title = "Internal error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return f"https://zhiva.ai/problems/{self.slug}"

    @property
    def slug(self) -> str:
        return self.title.lower().replace(" ", "-")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.detail!r})"


class BadRequest(ProblemError):
    status = 400
    title = "Bad request"


class Forbidden(ProblemError):
    status = 403
    title = "Forbidden"


class NotFound(ProblemError):
    status = 404
    title = "Not found"


class MethodNotAllowed(ProblemError):
    status = 405
    title = "Method not allowed"


class UpstreamError(ProblemError):
    """The PACS or the model failed or answered something invalid."""

    status = 502
    title = "Bad gateway"


class UpstreamTimeout(ProblemError):
    status = 504
    title = "Gateway timeout"


class Unauthorized(ProblemError):
    """No viewer token, or one that does not verify (``--viewer-auth-keys``)."""

    status = 401
    title = "Unauthorized"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None):
        # RFC 9110 15.5.2: a 401 MUST carry WWW-Authenticate; a raise that
        # forgets to build a challenge still sends the plain one.
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="zhiva"', **(headers or {})})


class TooMuchData(ProblemError):
    """The request selects more data than the proxy's limits allow."""

    status = 413
    title = "Too much data"


class URITooLong(ProblemError):
    status = 414
    title = "URI too long"


class ServiceUnavailable(ProblemError):
    """A model is busy and its queue is full, or the wait in it ran out."""

    status = 503
    title = "Service unavailable"
