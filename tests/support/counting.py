"""
A counting front for a real PACS: a plain HTTP reverse proxy on the test
reactor that passes every request on to Orthanc and records its path, so a
test can say how many WADO-RS requests the proxy under test really made.
"""
from __future__ import annotations

import warnings
from urllib.parse import urlsplit

from twisted.web.server import Site

with warnings.catch_warnings():
    # It speaks HTTP/1.0 to the upstream through the deprecated HTTPClient: fine for counting.
    warnings.simplefilter("ignore", DeprecationWarning)
    from twisted.web.proxy import ReverseProxyResource


class _Counting(ReverseProxyResource):
    def __init__(self, host: str, port: int, path: bytes, seen: list[str], reactor) -> None:
        super().__init__(host, port, path, reactor)
        self.seen = seen

    def getChild(self, path, request):
        child = super().getChild(path, request)
        return _Counting(child.host, child.port, child.path, self.seen, child.reactor)

    def render(self, request):
        self.seen.append(request.uri.decode("latin-1"))
        return super().render(request)


class CountingFront:
    """``url`` stands for ``upstream``; ``requests`` lists the paths asked for, in order."""

    def __init__(self, reactor, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.requests: list[str] = []
        root = _Counting(parts.hostname, parts.port, parts.path.encode(), self.requests, reactor)
        site = Site(root)
        site.noisy = False
        self._port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self._port.getHost().port}"

    def wado(self, marker: str = "/studies/") -> list[str]:
        """The retrieve requests seen (QIDO or status calls would not match)."""
        return [path for path in self.requests if marker in path]

    def close(self):
        return self._port.stopListening()
