"""
Viewer authentication and per-model access.

With ``--viewer-auth-keys`` every request (but ``/healthz``, ``/metrics`` and
CORS pre-flights) must carry ``Authorization: Bearer <JWT>`` signed with one
of the configured public keys (RS256 for RSA keys, ES256 for P-256 keys; no
other algorithm is ever accepted, so a token cannot pick its own), issued by
``--viewer-auth-issuer`` for ``--viewer-auth-audience`` and not expired
(60 s of clock skew allowed). Models with an ``access`` rule in models.json
then only serve the users or claim values the rule lists.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from zhiva.errors import Forbidden, Unauthorized

LEEWAY = 60.0
#: Claims tried, in order, for the user name an ``access.usernames`` list names.
USERNAME_CLAIMS = ("username", "preferred_username", "sub")
NO_ACCESS = "You have no access to this model"
MAX_TOKEN_LENGTH = 16384


class KeyFileError(ValueError):
    pass


@dataclass(frozen=True)
class VerificationKey:
    key: Any
    algorithm: str  # RS256 or ES256
    kid: str | None = None


def _algorithm(key: Any, where: str) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise KeyFileError(f"{where}: RSA key of {key.key_size} bits is too weak (2048 at least)")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise KeyFileError(f"{where}: only RSA (RS256) and P-256 EC (ES256) public keys are supported")


def load_keys(path: str | Path) -> tuple[VerificationKey, ...]:
    """The public keys of a PEM file (keys or certificates) or a JWKS JSON file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"viewer auth key file {path} cannot be read: {e.strerror or e}") from None
    if data.lstrip().startswith(b"{"):
        return _jwks(data, path)
    keys = []
    blocks = data.split(b"-----BEGIN ")[1:]
    for i, block in enumerate(blocks, 1):
        pem = b"-----BEGIN " + block
        where = f"viewer auth key file {path}: PEM block {i}"
        try:
            if pem.startswith(b"-----BEGIN CERTIFICATE-----"):
                key = x509.load_pem_x509_certificate(pem).public_key()
            elif pem.startswith(b"-----BEGIN PUBLIC KEY-----") or pem.startswith(b"-----BEGIN RSA PUBLIC KEY-----"):
                key = load_pem_public_key(pem)
            else:
                raise KeyFileError(
                    f"{where} is not a PUBLIC KEY or CERTIFICATE (never give the proxy a private key)"
                )
        except (ValueError, TypeError) as e:
            if isinstance(e, KeyFileError):
                raise
            raise KeyFileError(f"{where} cannot be parsed: {e}") from None
        keys.append(VerificationKey(key, _algorithm(key, where)))
    if not keys:
        raise KeyFileError(f"viewer auth key file {path} holds no PEM public key and is not a JWKS JSON file")
    return tuple(keys)


def _jwks(data: bytes, path: Path) -> tuple[VerificationKey, ...]:
    try:
        document = json.loads(data)
    except ValueError as e:
        raise KeyFileError(f"viewer auth key file {path} is not valid JSON: {e}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise KeyFileError(f'viewer auth key file {path}: a JWKS needs a non-empty "keys" list')
    keys = []
    for i, entry in enumerate(entries):
        where = f"viewer auth key file {path}: keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where} must be an object")
        if "d" in entry:
            raise KeyFileError(f"{where} is a private key; give the proxy public keys only")
        if entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry).key
        except jwt.PyJWTError as e:
            raise KeyFileError(f"{where} cannot be used: {e}") from None
        algorithm = _algorithm(key, where)
        if entry.get("alg") not in (None, algorithm):
            raise KeyFileError(f"{where}: alg {entry['alg']!r} is not supported for this key (use {algorithm})")
        kid = entry.get("kid")
        keys.append(VerificationKey(key, algorithm, kid if isinstance(kid, str) else None))
    if not keys:
        raise KeyFileError(f"viewer auth key file {path} has no signing key")
    return tuple(keys)


def _challenge(error: str | None, description: str) -> dict[str, str]:
    value = 'Bearer realm="zhiva"'
    if error:
        safe = description.replace("\\", "").replace('"', "'")
        value += f', error="{error}", error_description="{safe}"'
    return {"WWW-Authenticate": value}


class ViewerAuth:
    def __init__(self, keys, issuer: str, audience: str, leeway: float = LEEWAY) -> None:
        self.keys = tuple(keys)
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    def verify_header(self, header: bytes | None) -> Mapping[str, Any]:
        """The claims of the request's bearer token, or ``Unauthorized``."""
        if header is None:
            raise Unauthorized(
                "this proxy needs Authorization: Bearer <token> from the viewer",
                headers=_challenge(None, ""),
            )
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            raise Unauthorized(
                "the Authorization header must be Bearer <token>",
                headers=_challenge("invalid_request", "Bearer token expected"),
            )
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("the bearer token is too long", headers=_challenge("invalid_token", "token too long"))
        try:
            return self.verify(token.strip().decode("ascii"))
        except UnicodeDecodeError:
            raise Unauthorized("the bearer token is not ASCII", headers=_challenge("invalid_token", "not ASCII")) from None

    def verify(self, token: str) -> Mapping[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return self._refuse("the bearer token is not a JWT")
        kid = header.get("kid")
        candidates = [k for k in self.keys if k.algorithm == header.get("alg")]
        if isinstance(kid, str) and any(k.kid == kid for k in candidates):
            candidates = [k for k in candidates if k.kid == kid]
        if not candidates:
            return self._refuse(f"the bearer token is signed with {str(header.get('alg'))[:10]!r}, which no configured key uses")
        last: Exception | None = None
        for candidate in candidates:
            try:
                return jwt.decode(
                    token,
                    candidate.key,
                    algorithms=[candidate.algorithm],
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway,
                    options={"require": ["exp", "iss", "aud"]},
                )
            except jwt.InvalidSignatureError as e:
                last = e
                continue
            except jwt.ExpiredSignatureError:
                return self._refuse("the bearer token has expired")
            except jwt.InvalidAudienceError:
                return self._refuse("the bearer token is not meant for this proxy (audience)")
            except jwt.InvalidIssuerError:
                return self._refuse("the bearer token comes from an issuer this proxy does not trust")
            except jwt.MissingRequiredClaimError as e:
                return self._refuse(f"the bearer token has no {e.claim!r} claim")
            except jwt.ImmatureSignatureError:
                return self._refuse("the bearer token is not valid yet")
            except jwt.PyJWTError as e:
                last = e
                continue
        if isinstance(last, jwt.InvalidSignatureError):
            return self._refuse("the bearer token's signature does not verify with any configured key")
        return self._refuse("the bearer token cannot be verified")

    def _refuse(self, detail: str):
        raise Unauthorized(detail, headers=_challenge("invalid_token", detail))


# Per-model access rules (models.json "access")


@dataclass(frozen=True)
class AccessRule:
    usernames: frozenset[str] = frozenset()
    claims: tuple[tuple[str, frozenset[str]], ...] = ()

    def allows(self, claims: Mapping[str, Any]) -> bool:
        for name in USERNAME_CLAIMS:
            value = claims.get(name)
            if isinstance(value, str):
                if value in self.usernames:
                    return True
                break
        for name, allowed in self.claims:
            value = claims.get(name)
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, str) and v in allowed for v in values):
                return True
        return False


def check_access(model, claims: Mapping[str, Any] | None) -> None:
    """Raise 403 unless ``claims`` may use ``model`` (models without a rule are open)."""
    rule = getattr(model, "access", None)
    if rule is None:
        return
    if claims is None:
        raise Forbidden(f"{NO_ACCESS}: it has access rules and viewer authentication is off on this proxy")
    if not rule.allows(claims):
        raise Forbidden(NO_ACCESS)


def parse_access(entry) -> AccessRule | None:
    """The ``access`` field of a models.json entry (a config ``_Entry``), or None."""
    value = entry.raw("access")
    if value is None:
        return None
    if not isinstance(value, dict):
        entry.problem("access", 'must be an object such as {"usernames": ["alice"], "claims": {"group": ["radiology"]}}')
        return None
    ok = True
    for name in sorted(set(value) - {"usernames", "claims"}):
        entry.problem(f"access.{name}", 'unknown field; use "usernames" and/or "claims"')
        ok = False
    usernames = value.get("usernames", [])
    if not isinstance(usernames, list):
        entry.problem("access.usernames", "must be a list of user names")
        ok, usernames = False, []
    for i, name in enumerate(usernames):
        if not isinstance(name, str) or not name:
            entry.problem(f"access.usernames[{i}]", "must be a non-empty string")
            ok = False
    claims = value.get("claims", {})
    rules: list[tuple[str, frozenset[str]]] = []
    if not isinstance(claims, dict):
        entry.problem("access.claims", 'must be an object of claim name -> list of allowed values, e.g. {"group": ["radiology"]}')
        ok, claims = False, {}
    for claim, allowed in claims.items():
        where = f"access.claims.{claim}"
        if not claim:
            entry.problem("access.claims", "a claim name must not be empty")
            ok = False
            continue
        if not isinstance(allowed, list) or not allowed:
            entry.problem(where, "must be a non-empty list of allowed values (strings)")
            ok = False
            continue
        for i, item in enumerate(allowed):
            if not isinstance(item, str) or not item:
                entry.problem(f"{where}[{i}]", "must be a non-empty string")
                ok = False
        rules.append((claim, frozenset(a for a in allowed if isinstance(a, str))))
    if ok and not usernames and not rules:
        entry.problem("access", "lets no one in; list usernames or claims (to retire a model, remove its entry)")
        ok = False
    if not ok:
        return None
    return AccessRule(frozenset(usernames), tuple(sorted(rules)))
