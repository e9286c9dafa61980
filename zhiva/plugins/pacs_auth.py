"""
PACS auth schemes with static credentials: none and HTTP basic auth.
"""
from __future__ import annotations

from base64 import b64encode

from twisted.internet.defer import succeed
from twisted.plugin import IPlugin
from zope.interface import implementer

from zhiva.interfaces import IPacsAuth, IPacsAuthScheme


@implementer(IPacsAuth)
class StaticHeaders:
    """Fixed headers; a 401 cannot be cured by retrying with them."""

    def __init__(self, headers: dict[str, str]) -> None:
        self._headers = headers

    def __repr__(self) -> str:
        return f"<StaticHeaders {sorted(self._headers)}>"

    def headers(self):
        return succeed(self._headers)

    def rejected(self, sent):
        return succeed(False)


@implementer(IPlugin, IPacsAuthScheme)
class NoAuth:
    name = ""
    requires = ()

    def session(self, server, client, reactor, state_dir=None) -> IPacsAuth:
        return StaticHeaders({})


@implementer(IPlugin, IPacsAuthScheme)
class BasicAuth:
    name = "basicAuth"
    requires = ("login", "password")

    def session(self, server, client, reactor, state_dir=None) -> IPacsAuth:
        pair = f"{server.login}:{server.password.reveal()}".encode("utf-8")
        return StaticHeaders({"Authorization": "Basic " + b64encode(pair).decode("ascii")})


none = NoAuth()
basic = BasicAuth()
