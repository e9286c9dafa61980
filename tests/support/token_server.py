"""
A PACS token server and a token-checking PACS front for tests.

``TokenIssuer`` speaks the three endpoints of SPEC.md ("servers.json"):

- ``POST /sign-in`` with ``{"username", "password"}`` answers ``{"token": <authToken>}``;
- ``POST /token`` with ``Authorization: Bearer <authToken>`` answers 200 with
  ``Authorization: Bearer <access JWT>`` and the refresh token as the plain body
  (``/token-alt`` answers with ``Authentication: <access JWT>``, no ``Bearer``);
- ``POST /refresh`` with ``Authorization: Bearer <refresh>`` answers with
  ``Authorization: Bearer <new access JWT>``.

Access tokens are RS256 JWTs with a short ``exp``, timed by the clock given
(a ``twisted.internet.task.Clock`` for unit tests through ``StubTreq``, the
reactor for the in-process servers on 127.0.0.1:0). Counters and switches let
tests see and break each step. ``PacsFront`` checks the bearer token against
the issuer's public key and ``exp`` (401 otherwise) and proxies to a real
Orthanc, streaming.
"""
from __future__ import annotations

import base64
import json
import secrets
import warnings
from collections import Counter
from functools import cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.web.resource import Resource
from twisted.web.server import Site

with warnings.catch_warnings():
    # twisted.web.proxy is built on the deprecated twisted.web.http.HTTPClient;
    # good enough for a test PACS front.
    warnings.simplefilter("ignore", DeprecationWarning)
    from twisted.web.proxy import ReverseProxyResource

ISSUER = "zhiva-test-token-server"


@cache
def _signing_key() -> rsa.RSAPrivateKey:
    """One key per test session: generating RSA keys is slow."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def bearer_of(request) -> str | None:
    value = (request.getHeader(b"authorization") or b"").decode("latin-1")
    if value[:7].lower() != "bearer ":
        return None
    return value[7:].strip() or None


class TokenIssuer:
    """The token server's state; ``resource()`` is its twisted.web tree."""

    def __init__(
        self,
        clock,
        *,
        lifetime: int = 300,
        login: str = "radiologist",
        password: str = "pw",
        auth_token: str = "auth-token",
    ) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.login = login
        self.password = password
        self.auth_token = auth_token
        self.key = _signing_key()
        #: Requests per endpoint: "sign-in", "token", "refresh".
        self.calls: Counter[str] = Counter()
        self.reject_sign_in = False
        self.reject_token = False
        self.reject_refresh = False
        self.refresh_tokens: set[str] = set()
        #: Every token handed out, so tests can look for it where it must not be.
        self.issued: list[str] = []
        #: (issued at, exp) of every access token minted.
        self.minted: list[tuple[int, int]] = []

    # Tokens

    def mint(self, *, issued_at: int | None = None, lifetime: int | None = None) -> str:
        iat = int(self.clock.seconds()) if issued_at is None else issued_at
        exp = iat + (self.lifetime if lifetime is None else lifetime)
        header = {"alg": "RS256", "typ": "JWT"}
        claims = {
            "name": "Test Radiologist",
            "username": self.login,
            "canEditResource": False,
            "iat": iat,
            "exp": exp,
            "iss": ISSUER,
            "jti": secrets.token_hex(8),
        }
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        token = f"{signing_input}.{_b64(signature)}"
        self.issued.append(token)
        self.minted.append((iat, exp))
        return token

    def new_refresh_token(self) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        self.refresh_tokens.add(token)
        self.issued.append(token)
        return token

    def verify(self, token: str | None, at: float | None = None) -> bool:
        """Signed by us, issued by us, and not expired at ``at`` (default: now)."""
        if not token or token.count(".") != 2:
            return False
        header, payload, signature = token.split(".")
        try:
            self.key.public_key().verify(
                _unb64(signature), f"{header}.{payload}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
            )
            claims = json.loads(_unb64(payload))
        except (InvalidSignature, ValueError):
            return False
        now = self.clock.seconds() if at is None else at
        return claims.get("iss") == ISSUER and isinstance(claims.get("exp"), int) and now < claims["exp"]

    # Endpoints

    def sign_in(self, request) -> bytes:
        self.calls["sign-in"] += 1
        try:
            body = json.loads(request.content.read())
        except ValueError:
            body = None
        if (
            self.reject_sign_in
            or not isinstance(body, dict)
            or body.get("username") != self.login
            or body.get("password") != self.password
        ):
            return _refuse(request, b"wrong login or password")
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"token": self.auth_token}).encode()

    def token(self, request, *, alternative: bool = False) -> bytes:
        self.calls["token"] += 1
        if self.reject_token or bearer_of(request) != self.auth_token:
            return _refuse(request, b"unknown auth token")
        access = self.mint()
        if alternative:
            request.setHeader(b"Authentication", access.encode())
        else:
            request.setHeader(b"Authorization", f"Bearer {access}".encode())
        request.setHeader(b"Content-Type", b"text/plain")
        return self.new_refresh_token().encode()

    def refresh(self, request) -> bytes:
        self.calls["refresh"] += 1
        if self.reject_refresh or bearer_of(request) not in self.refresh_tokens:
            return _refuse(request, b"unknown refresh token")
        request.setHeader(b"Authorization", f"Bearer {self.mint()}".encode())
        return b""

    def resource(self) -> Resource:
        root = Resource()
        root.putChild(b"sign-in", _Post(self.sign_in))
        root.putChild(b"token", _Post(self.token))
        root.putChild(b"token-alt", _Post(lambda request: self.token(request, alternative=True)))
        root.putChild(b"refresh", _Post(self.refresh))
        return root


def _refuse(request, why: bytes) -> bytes:
    request.setResponseCode(401)
    request.setHeader(b"WWW-Authenticate", b"Bearer")
    return why


class _Post(Resource):
    isLeaf = True

    def __init__(self, handler) -> None:
        super().__init__()
        self._handler = handler

    def render_POST(self, request) -> bytes:
        return self._handler(request)


class PacsFront(Resource):
    """
    A PACS behind token auth: 401 unless the bearer token is one the issuer
    signed and is not expired; otherwise a streaming reverse proxy to the
    Orthanc at ``port`` (sending ``upstream_headers`` instead of the token).
    """

    isLeaf = True

    def __init__(self, issuer: TokenIssuer, reactor, port: int, upstream_headers: dict[str, str]) -> None:
        super().__init__()
        self.issuer = issuer
        self.reactor = reactor
        self.port = port
        self.upstream_headers = upstream_headers
        self.requests = 0
        self.accepted = 0
        #: 401s for a missing, foreign or expired token.
        self.refused = 0
        #: 401s forced by ``reject_next`` (a token the PACS revoked).
        self.forced = 0
        self.reject_next = 0
        #: Seconds to hold an answer back after its first bytes (a slow transfer).
        self.hold = 0.0

    def render(self, request):
        self.requests += 1
        token = bearer_of(request)
        if self.reject_next > 0:
            self.reject_next -= 1
            self.forced += 1
            return _refuse(request, b"token revoked")
        if not self.issuer.verify(token):
            self.refused += 1
            return _refuse(request, b"invalid or expired token")
        self.accepted += 1
        request.requestHeaders.removeHeader(b"authorization")
        for name, value in self.upstream_headers.items():
            request.requestHeaders.setRawHeaders(name, [value])
        if self.hold:
            self._hold(request)
        upstream = ReverseProxyResource("127.0.0.1", self.port, request.path, reactor=self.reactor)
        return upstream.render(request)

    def _hold(self, request) -> None:
        """Send the headers and first bytes at once, the rest after ``hold`` seconds."""
        write, finish = request.write, request.finish
        held: list = []

        def later_write(data: bytes) -> None:
            if request.startedWriting:
                held.append(lambda: write(data))
            else:
                write(data)

        def later_finish() -> None:
            held.append(finish)

        def release() -> None:
            request.write, request.finish = write, finish
            for step in held:
                step()

        request.write, request.finish = later_write, later_finish
        self.reactor.callLater(self.hold, release)


def listen(reactor, resource: Resource):
    """Serve ``resource`` on 127.0.0.1:0; returns (listening port, base URL)."""
    site = Site(resource)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}"
