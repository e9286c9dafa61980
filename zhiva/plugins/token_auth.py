"""
PACS auth schemes with short-lived tokens: ``token`` and ``zhivaAuth``.

``token`` starts from the long-lived ``authToken``; ``zhivaAuth`` first trades
``login`` and ``password`` for one at ``signInServer``. Both then POST it to
``signInTokenServer`` for an access token (a JWT, sent to the PACS as
``Authorization: Bearer``) and a refresh token (SPEC.md, "servers.json").

The access token is renewed ahead of its ``exp`` (read from the JWT without
verifying it: the PACS verifies) or after a 401, with ``refreshServer`` when
there is one, else by signing in from the start; a failed refresh signs in
from the start too. Only one renewal per server is in flight: every request
that needs it waits on the same attempt. Tokens only ever go in request
headers, so a renewal never touches a transfer already streaming.

With a state directory (``--state-dir``) the tokens are kept across restarts
in an owner-only file per server, keyed by a fingerprint of the server's auth
config so that editing the config drops them.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from zhiva.errors import ProblemError, UpstreamError
from zhiva.interfaces import IPacsAuth, IPacsAuthScheme
from zhiva.state import StateDir
from zhiva.upstream import (
    BodyTooLarge,
    ConnectionClosed,
    IdleTimeout,
    NoAnswer,
    answer_within,
    describe,
    read_body,
)

#: Renew this long before ``exp``, or 10% of the token's lifetime when that is
#: longer; never more than half the lifetime (tokens of a few seconds).
REFRESH_AHEAD = 30.0
REFRESH_FRACTION = 0.1
#: A token with less than this left (or 10% of a very short lifetime) is not
#: sent: the request waits for the renewal instead.
GUARD = 5.0
#: After a failed background renewal, the next one waits this long; requests
#: whose token has run out still try at once.
RETRY_AFTER_FAILURE = 5.0
#: Sign-in answers are a token or two.
MAX_ANSWER_BYTES = 64 * 1024


class SignInFailed(Exception):
    """One sign-in or refresh step failed; the message is safe to show (no secret)."""


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified; {} when ``token`` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def _public(url: str) -> str:
    """A URL fit for logs and problem details: no query string, no fragment."""
    return urlsplit(url)._replace(query="", fragment="").geturl()


def bearer(token: str) -> str:
    return f"Bearer {token}"


def _strip_bearer(value: str) -> str:
    """``Bearer xyz`` or ``xyz`` -> ``xyz``; a bare ``Bearer`` -> ''."""
    return _BEARER.sub("", value.strip())


_BEARER = re.compile(r"^bearer(?:\s+|$)", re.IGNORECASE)


def access_token(headers) -> str | None:
    """The access token of a token server's answer: ``Authorization`` or ``Authentication``."""
    for name in (b"authorization", b"authentication"):
        for raw in headers.getRawHeaders(name) or ():
            token = _strip_bearer(raw.decode("latin-1") if isinstance(raw, bytes) else raw)
            if token:
                return token
    return None


def plain_token(body: bytes) -> str | None:
    """A refresh token sent as the plain body (or, tolerated, as a JSON string)."""
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if text.startswith('"'):
        try:
            text = json.loads(text)
        except ValueError:
            return None
        if not isinstance(text, str):
            return None
        text = text.strip()
    if not text or any(c.isspace() for c in text) or text[0] in "{[":
        return None
    return _strip_bearer(text) or None


@dataclass(frozen=True)
class Tokens:
    """What a sign-in or refresh gave us, with times on the reactor clock."""

    access: str
    refresh: str | None
    exp: float | None
    issued: float

    @classmethod
    def received(cls, access: str, refresh: str | None, now: float) -> Tokens:
        claims = jwt_claims(access)
        exp = _seconds(claims.get("exp"))
        iat = _seconds(claims.get("iat"))
        # The lifetime counts from iat when it is plausible, else from receipt.
        plausible = iat is not None and iat <= now + 60 and (exp is None or iat < exp)
        return cls(access, refresh, exp, iat if plausible else now)

    def _margins(self) -> tuple[float, float]:
        lifetime = max(self.exp - self.issued, 0.0)
        ahead = min(max(REFRESH_AHEAD, REFRESH_FRACTION * lifetime), lifetime / 2)
        guard = min(GUARD, lifetime / 10)
        return ahead, guard

    @property
    def refresh_at(self) -> float:
        """From then on a request starts a renewal but still goes with this token."""
        return math.inf if self.exp is None else self.exp - self._margins()[0]

    @property
    def usable_until(self) -> float:
        """From then on a request waits for a new token."""
        return math.inf if self.exp is None else self.exp - self._margins()[1]

    def refresh_expired(self, now: float) -> bool:
        exp = _seconds(jwt_claims(self.refresh or "").get("exp"))
        return exp is not None and exp <= now


def fingerprint(server) -> str:
    """sha256 of the auth config of ``server``: secrets enter only as their own hashes."""

    def hashed(secret) -> str | None:
        return None if secret is None else hashlib.sha256(secret.reveal().encode("utf-8")).hexdigest()

    facts = {
        "uri": server.uri,
        "authType": server.auth_type,
        "login": server.login,
        "password": hashed(server.password),
        "authToken": hashed(server.auth_token),
        "signInServer": server.sign_in_server,
        "signInTokenServer": server.sign_in_token_server,
        "refreshServer": server.refresh_server,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode("utf-8")).hexdigest()


class TokenStore:
    """The tokens of one server in the state directory."""

    log = Logger()

    def __init__(self, state_dir: str | Path, server) -> None:
        self._dir = StateDir(state_dir)
        self._key = server.key
        self._fingerprint = fingerprint(server)
        self.name = f"pacs-tokens-{server.key}.json"

    @property
    def path(self) -> Path:
        return self._dir.path / self.name

    def load(self) -> Tokens | None:
        data = self._dir.read(self.name)
        if data is None:
            return None
        if data.get("fingerprint") != self._fingerprint:
            self.log.info(
                "Stored tokens of PACS server {key} dropped: its auth config changed", key=self._key
            )
            self.drop()
            return None
        access, refresh = data.get("access"), data.get("refresh")
        exp, issued = data.get("exp"), _seconds(data.get("issued"))
        if (
            not isinstance(access, str)
            or not access
            or not (refresh is None or isinstance(refresh, str))
            or not (exp is None or _seconds(exp) is not None)
            or issued is None
        ):
            self.log.warn("Stored tokens of PACS server {key} are malformed; ignoring them", key=self._key)
            return None
        return Tokens(access, refresh or None, _seconds(exp), issued)

    def save(self, tokens: Tokens) -> None:
        try:
            self._dir.write(
                self.name,
                {
                    "server": self._key,
                    "fingerprint": self._fingerprint,
                    "access": tokens.access,
                    "refresh": tokens.refresh,
                    "exp": tokens.exp,
                    "issued": tokens.issued,
                },
            )
        except OSError as e:
            self.log.warn(
                "Cannot keep the tokens of PACS server {key} in {path} ({error}); "
                "they will not survive a restart",
                key=self._key,
                path=str(self.path),
                error=e.strerror or str(e),
            )

    def drop(self) -> None:
        try:
            self._dir.remove(self.name)
        except OSError as e:
            self.log.warn("Cannot remove {path}: {error}", path=str(self.path), error=e.strerror or str(e))


@implementer(IPacsAuth)
class TokenSession:
    """
    The access token of one server: handed out while fresh, renewed by one
    shared attempt when due, refused or missing.
    """

    log = Logger()

    def __init__(self, server, client, clock, state_dir: str | Path | None = None) -> None:
        self.server = server
        self._client = client
        self._clock = clock
        self._store = TokenStore(state_dir, server) if state_dir is not None else None
        self._tokens: Tokens | None = self._store.load() if self._store is not None else None
        if self._tokens is not None:
            self.log.info(
                "Reusing the stored access token of PACS server {key} (expires {expires})",
                key=server.key,
                expires=_iso(self._tokens.exp) if self._tokens.exp is not None else "never",
            )
        #: An access token the PACS refused: never sent again.
        self._refused: str | None = None
        self._renewing = False
        self._waiters: list[Deferred] = []
        self._quiet_until = 0.0
        self._problem: str | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.server.key} signed_in={self._tokens is not None}>"

    # IPacsAuth

    def headers(self) -> Deferred:
        tokens = self._tokens
        now = self._clock.seconds()
        if tokens is None or tokens.access == self._refused or now >= tokens.usable_until:
            return self._renewal()
        if now >= tokens.refresh_at and not self._renewing and now >= self._quiet_until:
            # Renew ahead in the background; this request still has time.
            self._start()
        return succeed({"Authorization": bearer(tokens.access)})

    def rejected(self, sent) -> Deferred:
        tokens = self._tokens
        if tokens is not None and sent.get("Authorization") == bearer(tokens.access):
            if self._refused != tokens.access:
                self._refused = tokens.access
                self.log.info(
                    "PACS server {key} refused its access token (HTTP 401); renewing it",
                    key=self.server.key,
                )
            return self._renewal().addCallback(lambda _: True)
        if self._renewing:
            return self._renewal().addCallback(lambda _: True)
        # Renewed since that request left: retry with the new token.
        return succeed(tokens is not None)

    def describe(self) -> dict[str, Any]:
        tokens = self._tokens
        now = self._clock.seconds()
        signed_in = (
            tokens is not None
            and tokens.access != self._refused
            and (tokens.exp is None or now < tokens.exp)
        )
        facts: dict[str, Any] = {
            "signedIn": signed_in,
            "accessTokenExpiresAt": _iso(tokens.exp) if tokens is not None and tokens.exp is not None else None,
        }
        if self._problem is not None:
            facts["authProblem"] = self._problem
        return facts

    # One renewal in flight, shared

    def _renewal(self) -> Deferred:
        """A Deferred for the headers the renewal in flight (started if none) gives."""
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        self._start()
        return waiter

    def _start(self) -> None:
        if self._renewing:
            return
        self._renewing = True
        ensureDeferred(self._renew()).addBoth(self._renewed)

    def _renewed(self, result) -> None:
        self._renewing = False
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure):
            self._quiet_until = self._clock.seconds() + RETRY_AFTER_FAILURE
            if result.check(ProblemError):
                self._problem = result.value.detail
                self.log.warn("{detail}", detail=result.value.detail)
            else:
                self.log.failure("Renewing the token of PACS server {key} failed", result, key=self.server.key)
                result = Failure(UpstreamError(f"sign-in to PACS server {self.server.key} failed: internal error"))
        for waiter in waiters:
            if waiter.called:  # a viewer that hung up cancelled its own wait only
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _renew(self) -> dict[str, str]:
        tokens = self._tokens
        now = self._clock.seconds()
        if (
            tokens is not None
            and tokens.refresh
            and self.server.refresh_server
            and not tokens.refresh_expired(now)
        ):
            try:
                access, body = await self._exchange("refreshServer", self.server.refresh_server, tokens.refresh)
            except SignInFailed as e:
                self.log.info(
                    "Refreshing the access token of PACS server {key} failed ({reason}); signing in again",
                    key=self.server.key,
                    reason=str(e),
                )
            else:
                refreshed = Tokens.received(access, plain_token(body) or tokens.refresh, self._clock.seconds())
                return self._install(refreshed, "Refreshed")
        try:
            auth_token = await self._auth_token()
            access, body = await self._exchange(
                "signInTokenServer", self.server.sign_in_token_server, auth_token
            )
        except SignInFailed as e:
            raise UpstreamError(f"sign-in to PACS server {self.server.key} failed: {e}") from None
        return self._install(Tokens.received(access, plain_token(body), self._clock.seconds()), "Signed in to")

    def _install(self, tokens: Tokens, what: str) -> dict[str, str]:
        self._tokens = tokens
        self._refused = None
        self._problem = None
        self._quiet_until = 0.0
        if self._store is not None:
            self._store.save(tokens)
        now = self._clock.seconds()
        if tokens.exp is None:
            self.log.info(
                "{what} PACS server {key}: the access token has no exp; renewing it only on a 401",
                what=what,
                key=self.server.key,
            )
        elif tokens.usable_until <= now:
            self.log.warn(
                "{what} PACS server {key}, but the access token expires at {expires}, "
                "already past by this machine's clock; check the clocks",
                what=what,
                key=self.server.key,
                expires=_iso(tokens.exp),
            )
        else:
            self.log.info(
                "{what} PACS server {key} (access token valid until {expires}{refresh})",
                what=what,
                key=self.server.key,
                expires=_iso(tokens.exp),
                refresh="" if tokens.refresh else "; no refresh token",
            )
        return {"Authorization": bearer(tokens.access)}

    # The calls to the token server

    async def _auth_token(self) -> str:
        """The token to trade at signInTokenServer."""
        return self.server.auth_token.reveal()

    async def _exchange(self, step: str, url: str, token: str) -> tuple[str, bytes]:
        """POST ``url`` with ``token`` as bearer: the access token and the body."""
        response, body = await self._post(step, url, b"", {b"Authorization": [bearer(token).encode("latin-1")]})
        access = access_token(response.headers)
        if access is None:
            raise SignInFailed(
                f"{step} {_public(url)} answered without an access token in its "
                "Authorization or Authentication header"
            )
        return access, body

    async def _post(self, step: str, url: str, data: bytes, headers: dict) -> tuple[Any, bytes]:
        """POST and read a small answer; ``SignInFailed`` unless it is a 2xx."""
        where = f"{step} {_public(url)}"
        timeout = self.server.timeout
        request = self._client.post(url, data=data, headers=headers, allow_redirects=False, unbuffered=True)
        try:
            response = await answer_within(request, self._clock, timeout)
        except NoAnswer:
            raise SignInFailed(f"{where} did not answer within {timeout:g} s") from None
        except CancelledError:
            raise
        except Exception as e:
            raise SignInFailed(f"{where} is unreachable: {describe(Failure(e))}") from None
        try:
            body = await read_body(response, self._clock, timeout, MAX_ANSWER_BYTES)
        except IdleTimeout:
            raise SignInFailed(f"{where} stopped sending its answer for {timeout:g} s") from None
        except BodyTooLarge:
            raise SignInFailed(f"{where} answered more than {MAX_ANSWER_BYTES} bytes") from None
        except ConnectionClosed as e:
            raise SignInFailed(f"{where} broke off its answer: {e}") from None
        if not 200 <= response.code < 300:
            raise SignInFailed(f"{where} answered HTTP {response.code}")
        return response, body


class ZhivaAuthSession(TokenSession):
    """``token``, with the auth token got by signing in with login and password first."""

    async def _auth_token(self) -> str:
        url = self.server.sign_in_server
        credentials = {"username": self.server.login, "password": self.server.password.reveal()}
        _, body = await self._post(
            "signInServer",
            url,
            json.dumps(credentials).encode("utf-8"),
            {b"Content-Type": [b"application/json"], b"Accept": [b"application/json"]},
        )
        try:
            token = json.loads(body).get("token")
        except (ValueError, AttributeError, RecursionError):
            token = None
        if not isinstance(token, str) or not token.strip():
            raise SignInFailed(f'signInServer {_public(url)} answered without a "token" in a JSON object')
        return token.strip()


@implementer(IPlugin, IPacsAuthScheme)
class TokenAuth:
    name = "token"
    requires = ("authToken", "signInTokenServer")

    def session(self, server, client, reactor, state_dir=None) -> IPacsAuth:
        return TokenSession(server, client, reactor, state_dir)


@implementer(IPlugin, IPacsAuthScheme)
class ZhivaAuth:
    name = "zhivaAuth"
    requires = ("login", "password", "signInServer", "signInTokenServer")

    def session(self, server, client, reactor, state_dir=None) -> IPacsAuth:
        return ZhivaAuthSession(server, client, reactor, state_dir)


token = TokenAuth()
zhiva_auth = ZhivaAuth()
