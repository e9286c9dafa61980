"""
Viewer authentication (``--viewer-auth-keys``), per-model ``access`` rules,
the CORS allowlist with credentials, HSTS, and TLS below 1.2 refused.
"""
from __future__ import annotations

import json
import socket
import ssl
import time

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread

from tests.support.proxy import make_certificate, start_proxy, write_config
from zhiva import config as configuration
from zhiva.errors import Forbidden, Unauthorized
from zhiva.viewer_auth import AccessRule, KeyFileError, ViewerAuth, check_access, load_keys

SERVER = "66666666-6666-4666-8666-666666666661"
OPEN_MODEL = "66666666-6666-4666-8666-666666666662"
RADIOLOGY = "66666666-6666-4666-8666-666666666663"
ISSUER = "https://sso.hospital.example"
AUDIENCE = "zhiva-proxy"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def token(key=RSA_KEY, algorithm="RS256", *, exp=600, headers=None, **claims) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": None if exp is None else now + exp, "username": "alice", **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


@pytest.fixture
def keyfile(tmp_path):
    path = tmp_path / "viewer-keys.pem"
    path.write_bytes(pem(RSA_KEY) + pem(EC_KEY))
    return path


# Keys and tokens


def test_pem_file_with_rsa_and_ec_keys(keyfile):
    keys = load_keys(keyfile)
    assert [k.algorithm for k in keys] == ["RS256", "ES256"]


def test_jwks_file(tmp_path):
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    jwk_ec = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "r1"}, {**jwk_ec, "kid": "e1", "alg": "ES256"}]}))
    auth = ViewerAuth(load_keys(path), ISSUER, AUDIENCE)
    assert auth.verify(token(headers={"kid": "r1"}))["username"] == "alice"
    assert auth.verify(token(EC_KEY, "ES256", headers={"kid": "e1"}))["username"] == "alice"


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "holds no PEM public key"),
        (b"{not json", "not valid JSON"),
        (b'{"keys": []}', "non-empty \"keys\""),
        (RSA_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()), "never give the proxy a private key"),
        (rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), "too weak"),
        (pem(ec.generate_private_key(ec.SECP384R1())), "only RSA (RS256) and P-256"),
    ],
)
def test_unusable_key_files_are_named(tmp_path, content, words):
    path = tmp_path / "keys"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_keys(path)


def test_jwks_private_key_refused(tmp_path):
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    with pytest.raises(KeyFileError, match="private key"):
        load_keys(path)


def _hs256_with_public_key() -> str:
    """The classic algorithm confusion: HMAC keyed with the public key the proxy trusts."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}).encode())
    signature = hmac.new(pem(RSA_KEY), head + b"." + body, hashlib.sha256).digest()
    return (head + b"." + body + b"." + b64(signature)).decode()


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: token(exp=-120), "expired"),
        (lambda: token(aud="other-app"), "audience"),
        (lambda: token(iss="https://evil.example"), "issuer"),
        (lambda: token(OTHER_KEY), "signature does not verify"),
        (lambda: token(exp=None), "'exp'"),
        (lambda: _hs256_with_public_key(), "HS256"),
        (lambda: "not-a-jwt", "not a JWT"),
        (lambda: token()[:-4] + "AAAA", "signature"),
    ],
)
def test_bad_tokens_are_refused(keyfile, make, words):
    auth = ViewerAuth(load_keys(keyfile), ISSUER, AUDIENCE)
    with pytest.raises(Unauthorized) as caught:
        auth.verify(make())
    assert words in caught.value.detail
    assert caught.value.headers["WWW-Authenticate"].startswith('Bearer realm="zhiva", error="invalid_token"')


def test_clock_skew_allowed(keyfile):
    auth = ViewerAuth(load_keys(keyfile), ISSUER, AUDIENCE)
    assert auth.verify(token(exp=-30))["username"] == "alice"
    assert auth.verify(token(EC_KEY, "ES256"))["username"] == "alice"


@pytest.mark.parametrize("header", [None, b"Basic YWxpY2U6eA==", b"Bearer ", b"Bearer \xff\xfe"])
def test_missing_or_malformed_header(keyfile, header):
    auth = ViewerAuth(load_keys(keyfile), ISSUER, AUDIENCE)
    with pytest.raises(Unauthorized) as caught:
        auth.verify_header(header)
    assert caught.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_every_401_carries_a_challenge():
    assert Unauthorized("any reason").headers == {"WWW-Authenticate": 'Bearer realm="zhiva"'}


# Access rules


def test_access_rule_by_username_or_claim():
    rule = AccessRule(frozenset({"alice"}), (("group", frozenset({"radiology"})),))
    assert rule.allows({"username": "alice"})
    assert rule.allows({"username": "bob", "group": ["cardio", "radiology"]})
    assert rule.allows({"preferred_username": "x", "group": "radiology"})
    assert not rule.allows({"username": "bob", "group": ["cardio"]})
    assert not rule.allows({"sub": "bob"})
    with pytest.raises(Forbidden, match="You have no access to this model"):
        check_access(type("M", (), {"access": rule})(), {"username": "bob"})
    with pytest.raises(Forbidden, match="viewer authentication is off"):
        check_access(type("M", (), {"access": rule})(), None)


def _models(tmp_path, access):
    model = {"uri": "http://model:8011/p", "task": "prediction", "supports": ["/studies"], "access": access}
    directory = write_config(tmp_path / "c", {SERVER: {"uri": "http://pacs/dicom-web", "isDefault": True}},
                             {RADIOLOGY: model})
    return configuration.load(directory)


def test_access_config_is_loaded(tmp_path):
    config = _models(tmp_path, {"usernames": ["alice"], "claims": {"group": ["radiology"]}})
    assert config.models[RADIOLOGY].access.allows({"group": "radiology"})


@pytest.mark.parametrize(
    "access, field, words",
    [
        ("alice", "access", "must be an object"),
        ({}, "access", "lets no one in"),
        ({"users": ["a"]}, "access.users", "unknown field"),
        ({"usernames": "alice"}, "access.usernames", "list of user names"),
        ({"usernames": ["alice", 3]}, "access.usernames[1]", "non-empty string"),
        ({"claims": ["group"]}, "access.claims", "claim name -> list"),
        ({"claims": {"group": []}}, "access.claims.group", "non-empty list"),
        ({"claims": {"group": ["ok", ""]}}, "access.claims.group[1]", "non-empty string"),
    ],
)
def test_access_config_errors_are_precise(tmp_path, access, field, words):
    with pytest.raises(configuration.ConfigError) as caught:
        _models(tmp_path, access)
    (problem,) = caught.value.problems
    assert (problem.file, problem.key, problem.field) == ("models.json", RADIOLOGY, field)
    assert words in problem.message


# End to end


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def auth_proxy(tmp_path, orthanc, model_server, certificate):
    keys = tmp_path / "viewer.pem"
    keys.write_bytes(pem(RSA_KEY) + pem(EC_KEY))
    model = {"uri": model_server.url + "/prediction", "task": "prediction", "supports": ["/studies/series"]}
    config = write_config(
        tmp_path / "config",
        {SERVER: {"uri": orthanc.dicomweb, "isDefault": True}},
        {OPEN_MODEL: model, RADIOLOGY: {**model, "access": {"usernames": ["carol"], "claims": {"group": ["radiology"]}}}},
    )
    running = start_proxy(
        reactor, config, *certificate,
        "--viewer-auth-keys", str(keys), "--viewer-auth-issuer", ISSUER, "--viewer-auth-audience", AUDIENCE,
        "--cors-origin", "https://viewer.hospital.example", "--status-page",
    )
    yield running
    pytest_twisted.blockon(ensureDeferred(running.stop()))


def _path(study, model):
    return f"/predictions/{model}/studies/{study.study_uid}/series/{study.small_series_uid}"


def _bearer(value):
    return {"Authorization": f"Bearer {value}"}


@pytest_twisted.ensureDeferred
async def test_valid_token_is_served(auth_proxy, study):
    response, body = await auth_proxy.get(_path(study, OPEN_MODEL), headers=_bearer(token()))
    assert response.code == 200, body
    assert response.headers.getRawHeaders("strict-transport-security") == ["max-age=31536000"]


@pytest.mark.parametrize(
    "headers, words",
    [
        ({}, "needs Authorization: Bearer"),
        (_bearer(token(exp=-3600)), "expired"),
        (_bearer(token(aud="someone-else")), "audience"),
        (_bearer(token(OTHER_KEY)), "signature"),
    ],
    ids=["none", "expired", "wrong-audience", "wrong-key"],
)
@pytest_twisted.ensureDeferred
async def test_no_or_bad_token_is_401_before_any_upstream_call(auth_proxy, study, model_server, headers, words):
    before = model_server.last()
    response, body = await auth_proxy.get(_path(study, OPEN_MODEL), headers=headers)
    problem = json.loads(body)
    assert response.code == 401
    assert response.headers.getRawHeaders("content-type") == ["application/problem+json"]
    assert response.headers.getRawHeaders("www-authenticate")[0].startswith('Bearer realm="zhiva"')
    assert words in problem["detail"]
    assert model_server.last() == before


@pytest_twisted.ensureDeferred
async def test_user_without_access_gets_403(auth_proxy, study, model_server):
    before = model_server.last()
    response, body = await auth_proxy.get(_path(study, RADIOLOGY), headers=_bearer(token(group=["cardiology"])))
    assert response.code == 403
    assert json.loads(body)["detail"] == "You have no access to this model"
    assert model_server.last() == before
    for allowed in (token(group=["radiology"]), token(username="carol")):
        response, body = await auth_proxy.get(_path(study, RADIOLOGY), headers=_bearer(allowed))
        assert response.code == 200, body


@pytest_twisted.ensureDeferred
async def test_healthz_and_metrics_stay_open_status_needs_a_token(auth_proxy):
    assert (await auth_proxy.get("/healthz"))[0].code == 200
    assert (await auth_proxy.get("/metrics"))[0].code == 200
    refused = (await auth_proxy.get("/status"))[0]
    assert refused.code == 401
    assert refused.headers.getRawHeaders("www-authenticate") == ['Bearer realm="zhiva"']
    assert (await auth_proxy.get("/status", headers=_bearer(token())))[0].code == 200


@pytest_twisted.ensureDeferred
async def test_cors_preflight_from_allowed_and_refused_origins(auth_proxy, study, model_server):
    async def preflight(origin):
        response = await auth_proxy.client.request(
            "OPTIONS", auth_proxy.url + _path(study, OPEN_MODEL),
            headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                     "Access-Control-Request-Headers": "authorization"},
        )
        await response.content()
        return response

    allowed = await preflight("https://viewer.hospital.example")
    assert allowed.code == 204
    assert allowed.headers.getRawHeaders("access-control-allow-origin") == ["https://viewer.hospital.example"]
    assert allowed.headers.getRawHeaders("access-control-allow-credentials") == ["true"]
    # The answer depends on Origin: a cache must not hand it to another origin.
    assert allowed.headers.getRawHeaders("vary") == ["Origin"]
    assert "Authorization" in allowed.headers.getRawHeaders("access-control-allow-headers")[0]

    refused = await preflight("https://evil.example")
    assert refused.code == 403
    assert refused.headers.getRawHeaders("access-control-allow-origin") is None
    assert refused.headers.getRawHeaders("access-control-allow-credentials") is None
    assert refused.headers.getRawHeaders("access-control-allow-methods") is None
    assert refused.headers.getRawHeaders("vary") == ["Origin"]
    assert refused.headers.getRawHeaders("content-type") == ["application/problem+json"]

    # A simple GET needs no pre-flight: a page of another origin is refused too,
    # before any upstream call, even with a valid token.
    before = model_server.last()
    response, body = await auth_proxy.get(_path(study, OPEN_MODEL),
                                          headers={**_bearer(token()), "Origin": "https://evil.example"})
    assert response.code == 403
    assert json.loads(body)["detail"] == "origin 'https://evil.example' is not allowed (--cors-origin)"
    assert model_server.last() == before
    assert response.headers.getRawHeaders("access-control-allow-origin") is None
    assert response.headers.getRawHeaders("vary") == ["Origin"]
    # Clients that are no browser page send no Origin and are let through.
    response, body = await auth_proxy.get(_path(study, OPEN_MODEL), headers=_bearer(token()))
    assert response.code == 200, body
    response, _ = await auth_proxy.get(_path(study, OPEN_MODEL),
                                       headers={**_bearer(token()), "Origin": "https://viewer.hospital.example"})
    assert response.headers.getRawHeaders("access-control-allow-origin") == ["https://viewer.hospital.example"]
    assert response.headers.getRawHeaders("vary") == ["Origin"]


@pytest_twisted.ensureDeferred
async def test_wildcard_cors_never_sends_credentials(tmp_path, certificate):
    config = write_config(tmp_path / "c", {SERVER: {"uri": "http://127.0.0.1:9/dicom-web", "isDefault": True}}, {})
    proxy = start_proxy(reactor, config, *certificate)
    try:
        response, _ = await proxy.get("/healthz", headers={"Origin": "https://any.example"})
    finally:
        await proxy.stop()
    assert response.headers.getRawHeaders("access-control-allow-origin") == ["*"]
    assert response.headers.getRawHeaders("access-control-allow-credentials") is None
    assert response.headers.getRawHeaders("strict-transport-security") == ["max-age=31536000"]


def _handshake(port: int, maximum: ssl.TLSVersion) -> str:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = maximum
    context.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                return tls.version()
        except (ssl.SSLError, ConnectionError) as e:
            return f"refused: {e}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_listener_refuses_tls_1_1_and_below(tmp_path, certificate):
    config = write_config(tmp_path / "c", {SERVER: {"uri": "http://127.0.0.1:9/dicom-web", "isDefault": True}}, {})
    proxy = start_proxy(reactor, config, *certificate)
    port = int(proxy.url.rsplit(":", 1)[1])
    try:
        modern = await deferToThread(_handshake, port, ssl.TLSVersion.TLSv1_3)
        old = await deferToThread(_handshake, port, ssl.TLSVersion.TLSv1_1)
        oldest = await deferToThread(_handshake, port, ssl.TLSVersion.TLSv1)
    finally:
        await proxy.stop()
    assert modern in ("TLSv1.2", "TLSv1.3")
    assert old.startswith("refused"), old
    assert oldest.startswith("refused"), oldest


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_old_tls_client_really_speaks_tls_1_1(tmp_path):
    """Control for the test above: its client is not refused for its own reasons."""
    import threading

    cert, key = make_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.minimum_version = ssl.TLSVersion.TLSv1
    server_context.maximum_version = ssl.TLSVersion.TLSv1_1
    server_context.set_ciphers("ALL:@SECLEVEL=0")
    server_context.load_cert_chain(cert, key)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def serve():
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        version = _handshake(listener.getsockname()[1], ssl.TLSVersion.TLSv1_1)
        thread.join(10)
    if version.startswith("refused"):
        pytest.skip(f"this OpenSSL cannot speak TLS 1.1 at all: {version}")
    assert version == "TLSv1.1"
