"""
The ``token`` and ``zhivaAuth`` PACS auth schemes.

Unit tests drive a ``TokenSession`` against the test token server through
``StubTreq`` with a ``Clock`` (hours of simulated time in milliseconds); end
to end tests run viewer -> proxy -> token-checking PACS front -> real Orthanc
-> proxy -> real model API, with the token server on a real socket.
The last test checks that no token or password reached any log line,
problem detail or status page of the whole module.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import stat
from datetime import datetime

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from tests.support.proxy import free_port, make_certificate, start_proxy, write_config
from tests.support.token_server import PacsFront, TokenIssuer, listen
from zhiva import config as configuration
from zhiva.config import Secret, ServerConfig
from zhiva.errors import UpstreamError
from zhiva.plugins.token_auth import (
    TokenSession,
    TokenStore,
    Tokens,
    ZhivaAuthSession,
    access_token,
    fingerprint,
    jwt_claims,
    plain_token,
)
from zhiva.tap import StartupError, state_directory

TOKEN_SERVER = "0a0a0a0a-0000-4000-8000-000000000001"
ZHIVA_SERVER = "0a0a0a0a-0000-4000-8000-000000000002"
MODEL = "0b0b0b0b-0000-4000-8000-000000000001"
LOCAL_MODEL = "0b0b0b0b-0000-4000-8000-000000000002"

LOGIN = "radiologist"
PASSWORD = "pacs-password-" + secrets.token_hex(8)
AUTH_TOKEN = "pacs-auth-token-" + secrets.token_hex(8)
AUTH_TOKEN_ENV = "ZHIVA_TEST_PACS_AUTH_TOKEN"
PASSWORD_FILE = "pacs-password.txt"
START = 1_700_000_000.0

#: Every issuer of the module, and every text shown to a viewer or admin:
#: the last test looks for secrets in them.
ISSUERS: list[TokenIssuer] = []
SHOWN: list[str] = []
LOGGED: list[str] = []


def _event_text(event: dict) -> str:
    text = [formatEvent(event)]
    failure = event.get("log_failure")
    if failure is not None:
        text.append(failure.getTraceback())
    text.extend(repr(value) for key, value in event.items() if not key.startswith("log_"))
    return "\n".join(text)


@pytest.fixture(scope="module", autouse=True)
def every_log_line():
    def observe(event: dict) -> None:
        LOGGED.append(_event_text(event))

    globalLogPublisher.addObserver(observe)
    yield
    globalLogPublisher.removeObserver(observe)


def make_issuer(clock, **kwargs) -> TokenIssuer:
    issuer = TokenIssuer(clock, login=LOGIN, password=PASSWORD, auth_token=AUTH_TOKEN, **kwargs)
    ISSUERS.append(issuer)
    return issuer


# Unit level: Clock and StubTreq


def server_config(auth_type: str = "token", **changes) -> ServerConfig:
    base = ServerConfig(
        key=TOKEN_SERVER if auth_type == "token" else ZHIVA_SERVER,
        uri="http://pacs.test/dicom-web",
        auth_type=auth_type,
        auth_token=Secret(AUTH_TOKEN) if auth_type == "token" else None,
        login=LOGIN if auth_type == "zhivaAuth" else None,
        password=Secret(PASSWORD) if auth_type == "zhivaAuth" else None,
        sign_in_server="http://auth.test/sign-in" if auth_type == "zhivaAuth" else None,
        sign_in_token_server="http://auth.test/token",
        refresh_server="http://auth.test/refresh",
        timeout=10,
    )
    return dataclasses.replace(base, **changes)


class Harness:
    """A session on a Clock talking to the test token server through StubTreq."""

    def __init__(self, auth_type: str = "token", lifetime: int = 300, state_dir=None, **changes) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.issuer = make_issuer(self.clock, lifetime=lifetime)
        self.stub = StubTreq(self.issuer.resource())
        self.server = server_config(auth_type, **changes)
        self.state_dir = state_dir
        self.session = self.new_session()

    def new_session(self):
        kind = TokenSession if self.server.auth_type == "token" else ZhivaAuthSession
        return kind(self.server, self.stub, self.clock, self.state_dir)

    def result(self, d: Deferred):
        self.stub.flush()
        results: list = []
        d.addBoth(results.append)
        assert results, "still waiting"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def headers(self) -> dict:
        return self.result(self.session.headers())

    def token(self) -> str:
        return self.headers()["Authorization"].removeprefix("Bearer ")

    def hold(self) -> list:
        """From now on, token server calls wait until ``release(call)``."""
        held: list = []
        real = self.stub.post

        def post(*args, **kwargs):
            d: Deferred = Deferred()
            held.append((d, real, args, kwargs))
            return d

        self.stub.post = post
        self.session._client = self.stub
        return held

    @staticmethod
    def release(call) -> None:
        d, real, args, kwargs = call
        real(*args, **kwargs).chainDeferred(d)

    def pacs_get(self, latency: float = 0.0) -> int:
        """What DicomWebSource.get does: headers, a 401 from the PACS -> rejected, one retry."""
        for attempt in (1, 2):
            sent = self.headers()
            accepted = self.issuer.verify(sent["Authorization"].removeprefix("Bearer "), self.clock.seconds() + latency)
            if accepted:
                return 200
            if attempt == 2 or not self.result(self.session.rejected(sent)):
                break
        return 401


def test_token_scheme_signs_in_once_and_reuses_the_token():
    h = Harness("token")

    first = h.token()
    second = h.token()

    assert first == second
    assert h.issuer.verify(first)
    assert h.issuer.calls == {"token": 1}


def test_zhiva_auth_signs_in_with_login_then_trades_the_auth_token():
    h = Harness("zhivaAuth")

    assert h.issuer.verify(h.token())
    assert h.issuer.calls == {"sign-in": 1, "token": 1}


def test_hours_of_requests_never_send_an_expired_token():
    h = Harness("token", lifetime=300)
    rejected = 0
    # Six simulated hours, a request every 7 s: 72 token lifetimes.
    for _ in range(6 * 3600 // 7):
        if h.pacs_get(latency=1.0) != 200:
            rejected += 1
        h.clock.advance(7)

    assert rejected == 0
    assert h.issuer.calls["token"] == 1  # signed in once, refreshed since
    # Refreshed about once per lifetime: neither too late nor in a storm.
    lifetimes = 6 * 3600 // 300
    assert lifetimes <= h.issuer.calls["refresh"] <= 2 * lifetimes


def test_idle_longer_than_a_lifetime_renews_before_sending():
    h = Harness("token", lifetime=120)
    old = h.token()
    h.clock.advance(3600)

    new = h.token()

    assert new != old and h.issuer.verify(new)
    assert h.issuer.calls == {"token": 1, "refresh": 1}


def test_short_lived_tokens_are_still_used():
    h = Harness("token", lifetime=4)

    tokens = set()
    for _ in range(40):
        tokens.add(h.token())
        assert h.pacs_get() == 200
        h.clock.advance(0.5)

    # Renewed about every 2 s, not on every request.
    assert len(tokens) < 20
    assert h.issuer.calls["token"] == 1


def test_401_renews_once_for_concurrent_rejections():
    h = Harness("token")
    sent = h.headers()

    first = h.session.rejected(sent)
    second = h.session.rejected(sent)

    assert h.result(first) is True and h.result(second) is True
    assert h.issuer.calls == {"token": 1, "refresh": 1}
    assert h.headers() != sent


def test_late_401_after_a_renewal_retries_without_renewing_again():
    h = Harness("token")
    old = h.headers()
    assert h.result(h.session.rejected(old)) is True
    new = h.headers()

    assert h.result(h.session.rejected(old)) is True

    assert h.issuer.calls == {"token": 1, "refresh": 1}
    assert h.headers() == new


def test_twenty_concurrent_requests_with_an_expired_token_share_one_refresh():
    h = Harness("token", lifetime=300)
    h.token()
    h.clock.advance(400)
    held = h.hold()  # the token server answers once every request waits

    waiting = [h.session.headers() for _ in range(20)]
    assert len(held) == 1  # one refresh in flight for all twenty
    h.release(held[0])

    results = [h.result(w) for w in waiting]
    assert len({r["Authorization"] for r in results}) == 1
    assert h.issuer.verify(results[0]["Authorization"].removeprefix("Bearer "))
    assert h.issuer.calls == {"token": 1, "refresh": 1}


def test_a_viewer_hanging_up_does_not_cancel_the_shared_sign_in():
    h = Harness("token")
    held = h.hold()
    leaving, staying = h.session.headers(), h.session.headers()

    leaving.cancel()
    h.release(held[0])

    assert h.issuer.verify(h.result(staying)["Authorization"].removeprefix("Bearer "))
    assert len(held) == 1
    leaving.addErrback(lambda f: f.trap(CancelledError))


def test_refresh_rejected_signs_in_from_the_start():
    h = Harness("zhivaAuth")
    sent = h.headers()
    h.issuer.reject_refresh = True

    assert h.result(h.session.rejected(sent)) is True

    assert h.issuer.calls == {"sign-in": 2, "token": 2, "refresh": 1}
    assert h.issuer.verify(h.token())


def test_sign_in_rejected_is_an_upstream_error_naming_the_server():
    h = Harness("zhivaAuth")
    h.issuer.reject_sign_in = True

    with pytest.raises(UpstreamError) as caught:
        h.headers()

    detail = caught.value.detail
    SHOWN.append(detail)
    assert detail == (
        f"sign-in to PACS server {ZHIVA_SERVER} failed: signInServer http://auth.test/sign-in answered HTTP 401"
    )
    assert caught.value.status == 502
    facts = h.session.describe()
    assert facts["signedIn"] is False and facts["authProblem"] == detail


def test_auth_token_refused_is_an_upstream_error():
    h = Harness("token")
    h.issuer.reject_token = True

    with pytest.raises(UpstreamError) as caught:
        h.headers()

    SHOWN.append(caught.value.detail)
    assert "signInTokenServer http://auth.test/token answered HTTP 401" in caught.value.detail


def test_failed_background_renewal_keeps_the_valid_token():
    h = Harness("token", lifetime=300)
    token = h.token()
    h.issuer.reject_refresh = True
    h.issuer.reject_token = True
    h.clock.advance(280)  # inside the refresh-ahead window, still valid

    assert h.token() == token
    assert h.issuer.calls == {"token": 2, "refresh": 1}
    assert h.token() == token  # no new attempt right after a failure
    assert h.issuer.calls == {"token": 2, "refresh": 1}


def test_a_token_without_exp_is_renewed_only_on_401():
    h = Harness("token")
    session = h.session
    session._tokens = Tokens("opaque-access", None, None, START)
    h.clock.advance(10 * 86400)

    assert h.headers() == {"Authorization": "Bearer opaque-access"}
    assert h.result(session.rejected({"Authorization": "Bearer opaque-access"})) is True
    assert h.issuer.calls == {"token": 1}  # no refresh token: signed in again


def test_access_token_from_either_header_with_or_without_bearer():
    for name, value in [
        ("Authorization", "Bearer a.b.c"),
        ("Authentication", "a.b.c"),
        ("Authentication", "bearer a.b.c"),
        ("Authorization", "a.b.c"),
    ]:
        assert access_token(Headers({name: [value]})) == "a.b.c"
    assert access_token(Headers({})) is None
    assert access_token(Headers({"Authorization": ["Bearer "]})) is None


def test_refresh_token_is_the_plain_body():
    assert plain_token(b"rt-123\n") == "rt-123"
    assert plain_token(b'"rt-123"') == "rt-123"
    assert plain_token(b"") is None
    assert plain_token(b'{"ok": true}') is None
    assert plain_token(b"\xff") is None


def test_jwt_claims_without_verifying():
    h = Harness("token", lifetime=60)
    claims = jwt_claims(h.token())
    assert claims["exp"] - claims["iat"] == 60 and claims["username"] == LOGIN
    for garbage in ["", "abc", "a.b", "a.!!!.c", "a.bnVsbA.c", "a." + "W10" + ".c"]:
        assert jwt_claims(garbage) == {}


@pytest.mark.parametrize(
    "auth_type, missing",
    [("token", "authToken"), ("token", "signInTokenServer"), ("zhivaAuth", "login"),
     ("zhivaAuth", "password"), ("zhivaAuth", "signInServer"), ("zhivaAuth", "signInTokenServer")],
)
def test_config_names_each_missing_field(tmp_path, auth_type, missing):
    entry = {
        "uri": "http://pacs.test/dicom-web",
        "authType": auth_type,
        "authToken": "t",
        "login": LOGIN,
        "password": "p",
        "signInServer": "http://auth.test/sign-in",
        "signInTokenServer": "http://auth.test/token",
    }
    del entry[missing]
    write_config(tmp_path, {TOKEN_SERVER: entry}, {})

    with pytest.raises(configuration.ConfigError) as caught:
        configuration.load(tmp_path)

    (problem,) = caught.value.problems
    assert (problem.key, problem.field) == (TOKEN_SERVER, missing)
    assert f"is required for authType {auth_type!r}" in problem.message


# Persistence


def test_tokens_are_stored_owner_only_and_reused_by_a_new_session(tmp_path):
    h = Harness("zhivaAuth", state_dir=tmp_path / "state")
    token = h.token()
    stored = tmp_path / "state" / f"pacs-tokens-{ZHIVA_SERVER}.json"

    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]  # no temporary left
    data = json.loads(stored.read_text())
    assert data["access"] == token and data["fingerprint"] == fingerprint(h.server)
    assert PASSWORD not in stored.read_text()

    h.session = h.new_session()  # a restart
    assert h.token() == token
    assert h.issuer.calls == {"sign-in": 1, "token": 1}


def test_a_changed_server_config_drops_the_stored_tokens(tmp_path):
    h = Harness("zhivaAuth", state_dir=tmp_path)
    h.token()
    h.server = dataclasses.replace(h.server, refresh_server="http://auth.test/refresh?v=2")

    h.session = h.new_session()
    h.token()

    assert h.issuer.calls == {"sign-in": 2, "token": 2}
    stored = json.loads((tmp_path / f"pacs-tokens-{ZHIVA_SERVER}.json").read_text())
    assert stored["fingerprint"] == fingerprint(h.server)


def test_fingerprint_covers_the_auth_config_only():
    server = server_config("zhivaAuth")
    same = [dataclasses.replace(server, timeout=99, is_default=True, status_uri="http://pacs.test/status")]
    changed = [
        dataclasses.replace(server, uri="http://other.test/dicom-web"),
        dataclasses.replace(server, auth_type="token"),
        dataclasses.replace(server, login="someone-else"),
        dataclasses.replace(server, password=Secret(PASSWORD + "x")),
        dataclasses.replace(server, auth_token=Secret("t")),
        dataclasses.replace(server, sign_in_server="http://auth.test/other"),
        dataclasses.replace(server, sign_in_token_server="http://auth.test/other"),
        dataclasses.replace(server, refresh_server=None),
    ]
    assert {fingerprint(s) for s in same} == {fingerprint(server)}
    assert len({fingerprint(s) for s in changed} | {fingerprint(server)}) == len(changed) + 1
    assert PASSWORD not in fingerprint(server)


def test_malformed_stored_tokens_are_ignored(tmp_path):
    server = server_config("token")
    store = TokenStore(tmp_path, server)
    store.path.write_text(json.dumps({"fingerprint": fingerprint(server), "access": 7, "issued": 1}))
    assert store.load() is None
    store.path.write_text("{not json")
    assert store.load() is None


def test_state_dir_option_is_created_owner_only_or_refused(tmp_path):
    created = state_directory(str(tmp_path / "a" / "state"))
    assert created.is_dir() and stat.S_IMODE(created.stat().st_mode) == 0o700
    assert state_directory(None) is None
    (tmp_path / "file").write_text("")
    with pytest.raises(StartupError, match="state directory .* cannot be used"):
        state_directory(str(tmp_path / "file" / "state"))


# End to end: viewer -> proxy -> PACS front -> Orthanc, token server on a socket


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def issuer():
    return make_issuer(reactor, lifetime=300)


@pytest.fixture
def token_url(issuer):
    port, url = listen(reactor, issuer.resource())
    yield url
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def pacs(issuer, orthanc):
    front = PacsFront(issuer, reactor, orthanc.port, orthanc.auth_header())
    port, front.url = listen(reactor, front)
    yield front
    pytest_twisted.blockon(port.stopListening())


class SeriesPrediction(Resource):
    """
    A model API in-process, for many concurrent requests: the subprocess
    model server (tests/support/model_server.py) now and then drops one of 20
    simultaneous connections ("connection lost"), which is not what this
    module tests.
    """

    isLeaf = True

    def __init__(self, study) -> None:
        super().__init__()
        self.study = study
        self.received: list[int] = []

    def render_POST(self, request) -> bytes:
        instances = json.loads(request.content.read())
        self.received.append(len(instances))
        metadata = [{"dataType": "number", "value": len(instances), "title": "Slices"}]
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({self.study.study_uid: {self.study.small_series_uid: {"metadata": metadata}}}).encode()


@pytest.fixture
def local_model(study):
    model = SeriesPrediction(study)
    port, model.url = listen(reactor, model)
    yield model
    pytest_twisted.blockon(port.stopListening())


def servers_json(token_url: str, pacs_url: str) -> dict:
    return {
        TOKEN_SERVER: {
            "uri": pacs_url + "/dicom-web",
            "isDefault": True,
            "authType": "token",
            "authToken": {"env": AUTH_TOKEN_ENV},
            "signInTokenServer": token_url + "/token",
            "refreshServer": token_url + "/refresh",
        },
        ZHIVA_SERVER: {
            "uri": pacs_url + "/dicom-web",
            "authType": "zhivaAuth",
            "login": LOGIN,
            "password": {"file": PASSWORD_FILE},
            "signInServer": token_url + "/sign-in",
            # This one answers "Authentication: <token>", without "Bearer ".
            "signInTokenServer": token_url + "/token-alt",
            "refreshServer": token_url + "/refresh",
        },
    }


@pytest.fixture
def config_dir(tmp_path, token_url, pacs, model_server, local_model, monkeypatch):
    monkeypatch.setenv(AUTH_TOKEN_ENV, AUTH_TOKEN)
    directory = tmp_path / "config"
    models = {
        MODEL: {
            "uri": model_server.url + "/prediction",
            "task": "prediction",
            "supports": ["/studies", "/studies/series", "/studies/series/instances"],
        },
        LOCAL_MODEL: {"uri": local_model.url + "/predict", "task": "prediction", "supports": ["/studies/series"]},
    }
    write_config(directory, servers_json(token_url, pacs.url), models)
    (directory / PASSWORD_FILE).write_text(PASSWORD + "\n")
    return directory


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"


class Proxies:
    """Start proxies on the same config and state dir; stop them all at the end."""

    def __init__(self, config_dir, state_dir, certificate) -> None:
        self.args = (config_dir, *certificate)
        self.state_dir = state_dir
        self.running = []

    def start(self, *extra: str):
        proxy = start_proxy(reactor, *self.args, "--state-dir", str(self.state_dir), "--status-page", *extra)
        self.running.append(proxy)
        return proxy

    async def stop(self, proxy) -> None:
        self.running.remove(proxy)
        await proxy.stop()


@pytest.fixture
def proxies(config_dir, state_dir, certificate):
    started = Proxies(config_dir, state_dir, certificate)
    yield started
    for proxy in list(started.running):
        pytest_twisted.blockon(ensureDeferred(started.stop(proxy)))


def series_path(study, server: str, model: str = MODEL) -> str:
    return f"/predictions/{model}/studies/{study.study_uid}/series/{study.small_series_uid}?server={server}"


async def infer(proxy, study, server: str, model: str = MODEL):
    response, body = await proxy.get(series_path(study, server, model))
    if response.code != 200:
        SHOWN.append(body.decode("utf-8", "replace"))
    return response.code, json.loads(body)


@pytest.mark.parametrize("server", [TOKEN_SERVER, ZHIVA_SERVER])
@pytest_twisted.ensureDeferred
async def test_both_schemes_end_to_end(proxies, pacs, issuer, study, model_server, server):
    proxy = proxies.start()

    for _ in range(3):
        code, result = await infer(proxy, study, server)
        assert code == 200, result
        assert study.small_series_uid in result[study.study_uid]

    assert model_server.last()["sops"] == study.series[study.small_series_uid]
    expected = {"token": 1} if server == TOKEN_SERVER else {"sign-in": 1, "token": 1}
    assert issuer.calls == expected  # secrets came from env (token) and file (zhivaAuth)
    assert pacs.refused == 0 and pacs.accepted == pacs.requests == 3


@pytest_twisted.ensureDeferred
async def test_401_from_the_pacs_refreshes_once_and_retries_once(proxies, pacs, issuer, study):
    proxy = proxies.start()
    assert (await infer(proxy, study, ZHIVA_SERVER))[0] == 200
    before = pacs.requests
    pacs.reject_next = 1  # the PACS revoked the token

    code, result = await infer(proxy, study, ZHIVA_SERVER)

    assert code == 200, result
    assert pacs.requests - before == 2 and pacs.forced == 1
    assert issuer.calls == {"sign-in": 1, "token": 1, "refresh": 1}


@pytest_twisted.ensureDeferred
async def test_refresh_rejected_signs_in_again_end_to_end(proxies, pacs, issuer, study):
    proxy = proxies.start()
    assert (await infer(proxy, study, ZHIVA_SERVER))[0] == 200
    issuer.reject_refresh = True
    pacs.reject_next = 1

    code, result = await infer(proxy, study, ZHIVA_SERVER)

    assert code == 200, result
    assert issuer.calls == {"sign-in": 2, "token": 2, "refresh": 1}


@pytest_twisted.ensureDeferred
async def test_sign_in_rejected_is_a_502_with_a_clear_detail(proxies, pacs, issuer, study, model_server, token_url):
    proxy = proxies.start()
    before = model_server.last()
    issuer.reject_sign_in = True

    code, problem = await infer(proxy, study, ZHIVA_SERVER)

    assert code == 502
    assert problem["detail"] == (
        f"sign-in to PACS server {ZHIVA_SERVER} failed: signInServer {token_url}/sign-in answered HTTP 401"
    )
    assert pacs.requests == 0 and model_server.last() == before


@pytest_twisted.ensureDeferred
async def test_unreachable_token_server_is_a_502(tmp_path, certificate, pacs, study, monkeypatch):
    monkeypatch.setenv(AUTH_TOKEN_ENV, AUTH_TOKEN)
    directory = write_config(
        tmp_path / "down",
        {k: v for k, v in servers_json(f"http://127.0.0.1:{free_port()}", pacs.url).items() if k == TOKEN_SERVER},
        {MODEL: {"uri": "http://127.0.0.1:1/prediction", "task": "prediction", "supports": ["/studies/series"]}},
    )
    proxy = start_proxy(reactor, directory, *certificate)
    try:
        code, problem = await infer(proxy, study, TOKEN_SERVER)
    finally:
        await proxy.stop()

    assert code == 502
    assert problem["detail"].startswith(f"sign-in to PACS server {TOKEN_SERVER} failed: signInTokenServer http://127.0.0.1:")
    assert problem["detail"].endswith("is unreachable: connection refused")


@pytest_twisted.ensureDeferred
async def test_twenty_concurrent_requests_with_an_expired_token_refresh_once(
    proxies, pacs, issuer, study, config_dir, state_dir, local_model
):
    # A stored token that expired while the proxy was down, and its refresh token.
    server = configuration.load(config_dir).servers[ZHIVA_SERVER]
    now = int(reactor.seconds())
    expired = issuer.mint(issued_at=now - 600, lifetime=590)
    TokenStore(state_dir, server).save(Tokens(expired, issuer.new_refresh_token(), now - 10, now - 600))
    proxy = proxies.start("--no-coalescing")  # 20 separate PACS requests, not one shared run

    results = await gatherResults(
        [ensureDeferred(infer(proxy, study, ZHIVA_SERVER, LOCAL_MODEL)) for _ in range(20)]
    )

    assert [code for code, _ in results] == [200] * 20, [r for c, r in results if c != 200]
    assert local_model.received == [len(study.series[study.small_series_uid])] * 20
    assert issuer.calls == {"refresh": 1}
    assert pacs.refused == 0 and pacs.accepted == 20  # the expired token never went out


@pytest_twisted.ensureDeferred
async def test_a_transfer_that_outlives_the_token_is_not_cut_off(proxies, pacs, issuer, study):
    """
    The PACS sends its first bytes with a 2 s token still valid, then holds
    the rest for 3 s: the token expires mid-transfer and the series still
    arrives whole. The next request renews (refresh) and is served too.
    """
    issuer.lifetime = 2
    pacs.hold = 3.0
    proxy = proxies.start()

    started = reactor.seconds()
    code, result = await infer(proxy, study, TOKEN_SERVER)

    assert code == 200, result
    assert reactor.seconds() - started >= 3  # the token (2 s) ran out during the transfer
    assert pacs.requests == pacs.accepted == 1 and pacs.refused == 0
    assert issuer.calls == {"token": 1}
    pacs.hold = 0.0
    code, result = await infer(proxy, study, TOKEN_SERVER)
    assert code == 200, result
    assert issuer.calls == {"token": 1, "refresh": 1} and pacs.refused == 0


@pytest_twisted.ensureDeferred
async def test_restart_reuses_the_stored_token(proxies, issuer, study, state_dir):
    first = proxies.start()
    assert (await infer(first, study, ZHIVA_SERVER))[0] == 200
    await proxies.stop(first)
    stored = state_dir / f"pacs-tokens-{ZHIVA_SERVER}.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600

    second = proxies.start()
    assert (await infer(second, study, ZHIVA_SERVER))[0] == 200

    assert issuer.calls == {"sign-in": 1, "token": 1}  # none after the restart


@pytest_twisted.ensureDeferred
async def test_restart_with_a_changed_server_config_signs_in_again(proxies, issuer, study, config_dir):
    first = proxies.start()
    assert (await infer(first, study, ZHIVA_SERVER))[0] == 200
    await proxies.stop(first)
    servers = json.loads((config_dir / "servers.json").read_text())
    servers[ZHIVA_SERVER]["refreshServer"] += "?client=zhiva"
    (config_dir / "servers.json").write_text(json.dumps(servers))

    second = proxies.start()
    assert (await infer(second, study, ZHIVA_SERVER))[0] == 200

    assert issuer.calls == {"sign-in": 2, "token": 2}


@pytest_twisted.ensureDeferred
async def test_status_page_shows_sign_in_state_and_expiry(proxies, issuer, study):
    proxy = proxies.start()
    assert (await infer(proxy, study, ZHIVA_SERVER))[0] == 200

    response, body = await proxy.get("/status")
    SHOWN.append(body.decode())
    html_response, html_body = await proxy.get("/status", headers={"Accept": "text/html"})
    SHOWN.append(html_body.decode())

    assert response.code == 200 and html_response.code == 200
    report = json.loads(body)["servers"]
    signed_in, idle = report[ZHIVA_SERVER], report[TOKEN_SERVER]
    assert signed_in["authType"] == "zhivaAuth" and signed_in["signedIn"] is True
    (_, exp), = issuer.minted
    assert datetime.fromisoformat(signed_in["accessTokenExpiresAt"]).timestamp() == exp
    assert idle["authType"] == "token" and idle["signedIn"] is False
    assert idle["accessTokenExpiresAt"] is None
    assert f"zhivaAuth: signed in, token expires {signed_in['accessTokenExpiresAt']}" in html_body.decode()


# Last: nothing secret anywhere


def test_no_token_or_password_in_any_log_line_detail_or_status_page():
    secrets_seen = {PASSWORD, AUTH_TOKEN} | {token for issuer in ISSUERS for token in issuer.issued}
    assert len(secrets_seen) > 10 and LOGGED and SHOWN
    assert any("Signed in to PACS server" in line for line in LOGGED)
    assert any("Refreshed PACS server" in line for line in LOGGED)
    for text in LOGGED + SHOWN:
        for secret in secrets_seen:
            assert secret not in text, f"a secret leaked into: {text[:300]!r}"
        # Even a fragment of a JWT (its signature part) must not show.
        for token in (t for issuer in ISSUERS for t in issuer.issued if t.count(".") == 2):
            assert token.rsplit(".", 1)[1] not in text
