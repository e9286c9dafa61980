"""
TLS towards the PACS: verified by default, trusted through a per-server CA
file, and unverified only when a config says so (with a warning). The PACS
here is a small twisted.web server over TLS that answers WADO-RS with a
single-part ``application/dicom`` body, which the proxy must accept too.
"""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.support.proxy import make_certificate, start_proxy, write_config

CA_SERVER = "66666666-6666-4666-8666-666666666661"
NO_CA_SERVER = "66666666-6666-4666-8666-666666666662"
UNVERIFIED_SERVER = "66666666-6666-4666-8666-666666666663"
MODEL = "bbbbbbbb-0000-4000-8000-000000000001"


class SinglePartPACS(Resource):
    """Answers any WADO-RS instance retrieve with the one file it holds."""

    isLeaf = True

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data
        self.requests = 0

    def render_GET(self, request):
        self.requests += 1
        request.setHeader(b"Content-Type", b"application/dicom")
        return self.data


@pytest.fixture
def tls_pacs(tmp_path, study):
    cert, key = make_certificate(tmp_path, "pacs")
    sop = study.series[study.small_series_uid][0]
    pacs = SinglePartPACS(study.paths[sop].read_bytes())
    options = PrivateCertificate.loadPEM(cert.read_text() + key.read_text()).options()
    port = reactor.listenSSL(0, Site(pacs), options, interface="127.0.0.1")
    yield pacs, port.getHost().port, cert
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def proxy(tmp_path, tls_pacs, model_server):
    _, port, ca = tls_pacs
    uri = f"https://127.0.0.1:{port}/dicom-web"
    config = write_config(
        tmp_path / "config",
        {
            CA_SERVER: {"uri": uri, "caFile": str(ca), "isDefault": True},
            NO_CA_SERVER: {"uri": uri},
            UNVERIFIED_SERVER: {"uri": uri, "tlsVerify": False},
        },
        {MODEL: {"uri": model_server.url + "/prediction", "task": "prediction",
                 "supports": ["/studies/series/instances"]}},
    )
    events = []
    globalLogPublisher.addObserver(events.append)
    running = start_proxy(reactor, config, *make_certificate(tmp_path))
    running.events = events
    yield running
    globalLogPublisher.removeObserver(events.append)
    pytest_twisted.blockon(ensureDeferred(running.stop()))


def _path(study) -> str:
    series = study.small_series_uid
    return (
        f"/predictions/{MODEL}/studies/{study.study_uid}/series/{series}"
        f"/instances/{study.series[series][0]}"
    )


@pytest_twisted.ensureDeferred
async def test_pacs_with_a_private_ca_is_trusted_through_ca_file(proxy, study, model_server, tls_pacs):
    response, result = await proxy.get_json(_path(study), params={"server": CA_SERVER})

    assert response.code == 200, result
    assert model_server.last()["sops"] == [study.series[study.small_series_uid][0]]
    assert tls_pacs[0].requests == 1


@pytest_twisted.ensureDeferred
async def test_unknown_pacs_certificate_is_refused(proxy, study, tls_pacs):
    response, problem = await proxy.get_json(_path(study), params={"server": NO_CA_SERVER})

    assert response.code == 502
    assert NO_CA_SERVER in problem["detail"]
    assert "TLS handshake failed" in problem["detail"]
    assert tls_pacs[0].requests == 0


@pytest_twisted.ensureDeferred
async def test_unverified_tls_works_only_when_asked_and_is_logged(proxy, study):
    response, result = await proxy.get_json(_path(study), params={"server": UNVERIFIED_SERVER})

    assert response.code == 200, result
    warnings = [
        e for e in proxy.events
        if e.get("log_level") is not None and e["log_level"].name == "warn"
        and UNVERIFIED_SERVER in str(e.get("warning", "")) + str(e.get("key", ""))
    ]
    assert warnings, "tlsVerify: false must be logged as a warning"
