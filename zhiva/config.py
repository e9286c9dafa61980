"""
The config model: servers.json and models.json as immutable values.

``load(directory)`` reads and validates both files whole and either returns a
``Config`` or raises ``ConfigError`` listing every problem, each naming the
file, the entry key and the field. Nothing here touches the network, so a
broken file can never replace a running config (the service swaps whole
``Config`` values only).
"""
from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from zhiva import registry
from zhiva.viewer_auth import parse_access

SERVERS_FILE = "servers.json"
MODELS_FILE = "models.json"

LEVELS = ("/studies", "/studies/series", "/studies/series/instances")
DEFAULT_PROTOCOL = "zhiva-json"
PLUGIN_PREFIX = "plugin:"
DEFAULT_PACS_TIMEOUT = 60.0
# Real inference on a big series takes minutes on a CPU-only model server.
DEFAULT_MODEL_TIMEOUT = 600.0

_DATA_KEY = re.compile(r"[A-Za-z0-9-]+")


class Secret:
    """
    A password or token: usable by code through ``reveal()``, never shown by
    ``repr``/``str``/logs/pages.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))


@dataclass(frozen=True)
class Problem:
    file: str
    key: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.key is not None:
            where += f': entry "{self.key}"'
        if self.field is not None:
            where += f': field "{self.field}"'
        return f"{where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


@dataclass(frozen=True)
class DataFilterSpec:
    """One named input a model needs (``dataFilter`` in models.json)."""

    data_key: str
    title: str
    description: str | None = None
    data_filter: tuple[DataFilterSpec, ...] = ()


@dataclass(frozen=True)
class ServerConfig:
    key: str
    uri: str
    is_default: bool = False
    status_uri: str | None = None
    auth_type: str = ""
    login: str | None = None
    password: Secret | None = None
    auth_token: Secret | None = None
    sign_in_server: str | None = None
    sign_in_token_server: str | None = None
    refresh_server: str | None = None
    ca_file: Path | None = None
    tls_verify: bool = True
    timeout: float = DEFAULT_PACS_TIMEOUT


@dataclass(frozen=True)
class ResultCacheConfig:
    """
    ``resultCache`` of a models.json entry: keep this model's checked
    results in memory and answer a repeated identical request from them.
    Off unless given: a model whose answer may change for the same input
    (retrained weights behind the same URI) should not have it.
    """

    ttl: float = 3600.0
    max_entries: int = 100
    #: Results bigger than this are not kept; the total per model stays under it too.
    max_bytes: int = 256 << 20


@dataclass(frozen=True)
class ModelConfig:
    key: str
    uri: str
    task: str
    supports: frozenset[str]
    status_uri: str | None = None
    data_filter: tuple[DataFilterSpec, ...] = ()
    protocol: str = DEFAULT_PROTOCOL
    ca_file: Path | None = None
    tls_verify: bool = True
    timeout: float = DEFAULT_MODEL_TIMEOUT
    #: Who may use the model (``access``, zhiva.viewer_auth.AccessRule); None: anyone.
    access: Any = None
    #: ``resultCache``; None: every request calls the model.
    result_cache: ResultCacheConfig | None = None

    @property
    def plugin(self) -> str | None:
        """The in-process model's name, for ``plugin:NAME`` URIs."""
        if self.uri.startswith(PLUGIN_PREFIX):
            return self.uri[len(PLUGIN_PREFIX) :]
        return None


@dataclass(frozen=True, eq=False)
class Config:
    directory: Path
    servers: Mapping[str, ServerConfig]
    models: Mapping[str, ModelConfig]
    warnings: tuple[str, ...] = field(default=())

    def default_server(self) -> ServerConfig | None:
        for server in self.servers.values():
            if server.is_default:
                return server
        return None


def load(directory: str | os.PathLike) -> Config:
    """
    Read, validate and freeze both files in ``directory``; raise
    ``ConfigError`` with every problem found.
    """
    directory = Path(directory)
    problems: list[Problem] = []
    warnings: list[str] = []
    servers = _load_entries(directory, SERVERS_FILE, _server, problems, warnings)
    models = _load_entries(directory, MODELS_FILE, _model, problems, warnings)
    defaults = [key for key, server in servers.items() if server.is_default]
    if len(defaults) > 1:
        for key in defaults:
            problems.append(
                Problem(
                    SERVERS_FILE,
                    key,
                    "isDefault",
                    f"more than one default server ({', '.join(defaults)}); "
                    "set isDefault: true on one only",
                )
            )
    if problems:
        raise ConfigError(problems)
    return Config(
        directory=directory,
        servers=MappingProxyType(servers),
        models=MappingProxyType(models),
        warnings=tuple(warnings),
    )


def _load_entries(
    directory: Path,
    name: str,
    build: Callable[[_Entry], Any],
    problems: list[Problem],
    warnings: list[str],
) -> dict[str, Any]:
    path = directory / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(
            Problem(name, None, None, f"not found in {directory.resolve()}; create it (see README)")
        )
        return {}
    except (OSError, UnicodeDecodeError) as e:
        problems.append(Problem(name, None, None, f"cannot be read: {e}"))
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(
            Problem(name, None, None, f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
        )
        return {}
    except (ValueError, RecursionError) as e:
        # Numbers over Python's digit limit, or nesting deeper than the stack.
        problems.append(Problem(name, None, None, f"cannot be parsed: {e}"))
        return {}
    if not isinstance(data, dict):
        problems.append(
            Problem(name, None, None, f"must be a JSON object keyed by UUID, not {_json_type(data)}")
        )
        return {}
    built: dict[str, Any] = {}
    for key, value in data.items():
        entry = _Entry(name, key, value, directory, problems, warnings)
        if not _is_uuid(key):
            entry.problem(None, "key must be a UUID such as 6f1c2b1e-8f5d-4e0b-9a51-3c2d1e0f4a7b")
            continue
        if not isinstance(value, dict):
            entry.problem(None, f"must be a JSON object, not {_json_type(value)}")
            continue
        before = len(problems)
        item = build(entry)
        entry.warn_unknown()
        if len(problems) == before:
            built[key] = item
    return built


class _Entry:
    """Reads typed fields of one entry, recording problems instead of raising."""

    def __init__(self, file, key, value, directory, problems, warnings) -> None:
        self.file = file
        self.key = key
        self.value = value
        self.directory = directory
        self.problems = problems
        self.warnings = warnings
        self.seen: set[str] = set()

    def problem(self, field_name: str | None, message: str) -> None:
        self.problems.append(Problem(self.file, self.key, field_name, message))

    def warn_unknown(self) -> None:
        for name in sorted(set(self.value) - self.seen):
            self.warnings.append(
                f'{self.file}: entry "{self.key}": unknown field "{name}" ignored'
            )

    def raw(self, name: str) -> Any:
        self.seen.add(name)
        return self.value.get(name)

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self.raw(name)
        if value is None:
            if required:
                self.problem(name, "is required")
            return None
        if not isinstance(value, str):
            self.problem(name, f"must be a string, not {_json_type(value)}")
            return None
        if not value:
            if required:
                self.problem(name, "must not be empty")
            return None
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(name, f"must be true or false, not {json.dumps(value)[:40]}")
            return default
        return value

    def seconds(self, name: str, default: float) -> float:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
            self.problem(name, "must be a number of seconds between 0 and 86400")
            return default
        return float(value)

    def url(self, name: str, schemes: tuple[str, ...], *, required: bool = False) -> str | None:
        value = self.string(name, required=required)
        if value is None:
            return None
        message = _url_problem(value, schemes)
        if message:
            self.problem(name, message)
            return None
        return value

    def secret(self, name: str) -> Secret | None:
        """A secret given inline, or as {"env": NAME} or {"file": PATH}."""
        value = self.raw(name)
        if value is None or value == "":
            return None
        if isinstance(value, str):
            return Secret(value)
        if isinstance(value, dict) and set(value) == {"env"} and isinstance(value["env"], str):
            try:
                resolved = os.environ.get(value["env"])
            except ValueError:  # a name the OS cannot encode
                resolved = None
            if resolved is None:
                self.problem(name, f'environment variable {value["env"]} is not set')
                return None
            return Secret(resolved)
        if isinstance(value, dict) and set(value) == {"file"} and isinstance(value["file"], str):
            path = self.directory / value["file"]
            try:
                return Secret(path.read_text(encoding="utf-8").rstrip("\r\n"))
            except (OSError, ValueError) as e:
                reason = getattr(e, "strerror", None) or e
                self.problem(name, f"secret file {path} cannot be read: {reason}")
                return None
        self.problem(name, 'must be a string, {"env": "VARIABLE"} or {"file": "/path"}')
        return None

    def ca_file(self) -> Path | None:
        value = self.string("caFile")
        if value is None:
            return None
        path = self.directory / value
        try:
            exists = path.is_file()
        except (OSError, ValueError):  # e.g. a name too long for the OS
            exists = False
        if not exists:
            self.problem("caFile", f"CA file {path} does not exist")
            return None
        return path

    def tls_verify(self) -> bool:
        verify = self.boolean("tlsVerify", True)
        if not verify:
            self.warnings.append(
                f'{self.file}: entry "{self.key}": tlsVerify is false: '
                "TLS certificates of this upstream are NOT verified"
            )
        return verify


def _server(entry: _Entry) -> ServerConfig:
    sources = registry.sources_by_scheme()
    uri = entry.url("uri", tuple(sources), required=True)
    check_uri = getattr(sources.get(uri.split(":", 1)[0].lower()), "check_uri", None) if uri else None
    if check_uri is not None:
        # A source may know more about its URIs (a folder needs an absolute path).
        message = check_uri(uri)
        if message:
            entry.problem("uri", message)
            uri = None
    auth_type = entry.string("authType") or ""
    auth = registry.auth_schemes().get(auth_type)
    if auth is None:
        known = ", ".join(repr(n) for n in sorted(registry.auth_schemes()))
        entry.problem("authType", f"unknown auth type {auth_type!r}; known: {known}")
    auth_token = entry.secret("authToken")
    if entry.raw("token") is not None:
        # Older guides called the long-lived token "token".
        auth_token = auth_token or entry.secret("token")
    server = ServerConfig(
        key=entry.key,
        uri=(uri or "").rstrip("/"),
        is_default=entry.boolean("isDefault", False),
        status_uri=entry.url("statusUri", ("http", "https")),
        auth_type=auth_type,
        login=entry.string("login"),
        password=entry.secret("password"),
        auth_token=auth_token,
        sign_in_server=entry.url("signInServer", ("http", "https")),
        sign_in_token_server=entry.url("signInTokenServer", ("http", "https")),
        refresh_server=entry.url("refreshServer", ("http", "https")),
        ca_file=entry.ca_file(),
        tls_verify=entry.tls_verify(),
        timeout=entry.seconds("timeout", DEFAULT_PACS_TIMEOUT),
    )
    if auth is not None:
        for name in auth.requires:
            reported = any(
                (p.file, p.key, p.field) == (entry.file, entry.key, name) for p in entry.problems
            )
            if getattr(server, _ATTRIBUTE[name]) is None and not reported:
                entry.problem(name, f"is required for authType {auth_type!r}")
    return server


_ATTRIBUTE = {
    "login": "login",
    "password": "password",
    "authToken": "auth_token",
    "signInServer": "sign_in_server",
    "signInTokenServer": "sign_in_token_server",
    "refreshServer": "refresh_server",
}


def _model(entry: _Entry) -> ModelConfig:
    uri = _model_uri(entry)
    task = entry.string("task", required=True)
    if task is not None and task not in registry.tasks():
        entry.problem("task", f"must be one of {', '.join(sorted(registry.tasks()))}, not {task!r}")
    protocol = entry.string("protocol") or DEFAULT_PROTOCOL
    if protocol not in registry.protocols():
        known = ", ".join(sorted(registry.protocols()))
        entry.problem("protocol", f"unknown protocol {protocol!r}; known: {known}")
    return ModelConfig(
        key=entry.key,
        uri=uri or "",
        task=task or "",
        supports=_supports(entry),
        status_uri=entry.url("statusUri", ("http", "https")),
        data_filter=_data_filter(entry, entry.raw("dataFilter"), "dataFilter"),
        protocol=protocol,
        ca_file=entry.ca_file(),
        tls_verify=entry.tls_verify(),
        timeout=entry.seconds("timeout", DEFAULT_MODEL_TIMEOUT),
        access=parse_access(entry),
        result_cache=_result_cache(entry),
    )


_RESULT_CACHE_FIELDS = {
    # JSON name: (attribute, lowest, highest, integer only)
    "ttl": ("ttl", 1, 7 * 86400, False),
    "maxEntries": ("max_entries", 1, 100_000, True),
    "maxBytes": ("max_bytes", 1, 1 << 40, True),
}


def _result_cache(entry: _Entry) -> ResultCacheConfig | None:
    """``resultCache``: absent or null is off; ``{}`` is on with the defaults."""
    value = entry.raw("resultCache")
    if value is None:
        return None
    if not isinstance(value, dict):
        entry.problem(
            "resultCache",
            f'must be an object such as {{"ttl": 3600, "maxEntries": 100}}, not {_json_type(value)}',
        )
        return None
    found: dict[str, Any] = {}
    for name, item in value.items():
        spec = _RESULT_CACHE_FIELDS.get(name)
        if spec is None:
            entry.problem(f"resultCache.{name}", "unknown field; use ttl, maxEntries and/or maxBytes")
            continue
        attribute, lowest, highest, integer = spec
        number = isinstance(item, (int, float)) and not isinstance(item, bool)
        if not number or (integer and not isinstance(item, int)) or not lowest <= item <= highest:
            kind = "a whole number" if integer else "a number"
            unit = " of seconds" if name == "ttl" else ""
            entry.problem(f"resultCache.{name}", f"must be {kind}{unit} from {lowest} to {highest}")
            continue
        found[attribute] = float(item) if name == "ttl" else item
    return ResultCacheConfig(**found)


def _model_uri(entry: _Entry) -> str | None:
    """An http(s) URL of a model API, or ``plugin:NAME`` of an in-process model."""
    raw = entry.value.get("uri")
    if isinstance(raw, str) and raw.startswith(PLUGIN_PREFIX):
        entry.seen.add("uri")
        name = raw[len(PLUGIN_PREFIX) :]
        if name not in registry.models():
            known = ", ".join(sorted(registry.models())) or "none installed"
            entry.problem("uri", f"no in-process model plugin {name!r} (known: {known})")
            return None
        return raw
    return entry.url("uri", ("http", "https"), required=True)


def _supports(entry: _Entry) -> frozenset[str]:
    value = entry.raw("supports")
    if value is None:
        entry.problem("supports", f"is required: a list of {', '.join(LEVELS)}")
        return frozenset()
    if not isinstance(value, list) or not value:
        entry.problem("supports", f"must be a non-empty list of {', '.join(LEVELS)}")
        return frozenset()
    for level in value:
        if level not in LEVELS:
            entry.problem("supports", f"unknown level {json.dumps(level)[:80]}; use {', '.join(LEVELS)}")
    known = [level for level in value if level in LEVELS]
    if len(set(known)) != len(known):
        entry.problem("supports", "lists a level twice")
    return frozenset(known)


def _data_filter(entry: _Entry, value: Any, path: str) -> tuple[DataFilterSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        entry.problem(path, f"must be a list of {{dataKey, title}} objects, not {_json_type(value)}")
        return ()
    specs = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            entry.problem(where, f"must be an object, not {_json_type(item)}")
            continue
        data_key, title = item.get("dataKey"), item.get("title")
        if not isinstance(data_key, str) or not _DATA_KEY.fullmatch(data_key):
            entry.problem(f"{where}.dataKey", "must be letters, digits and hyphens")
            continue
        if not isinstance(title, str) or not title:
            entry.problem(f"{where}.title", "must be a non-empty string")
            continue
        description = item.get("description")
        if description is not None and not isinstance(description, str):
            entry.problem(f"{where}.description", "must be a string")
        if any(spec.data_key == data_key for spec in specs):
            entry.problem(f"{where}.dataKey", f"{data_key!r} is used twice")
        for name in sorted(set(item) - {"dataKey", "title", "description", "dataFilter"}):
            entry.warnings.append(
                f'{entry.file}: entry "{entry.key}": unknown field "{where}.{name}" ignored'
            )
        specs.append(
            DataFilterSpec(
                data_key=data_key,
                title=title,
                description=description if isinstance(description, str) else None,
                data_filter=_data_filter(entry, item.get("dataFilter"), f"{where}.dataFilter"),
            )
        )
    return tuple(specs)


def _url_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    try:
        parts = urlsplit(value)
    except ValueError as e:
        return f"is not a valid URL: {e}"
    allowed = " or ".join(f"{s}://" for s in sorted(schemes))
    if parts.scheme.lower() not in schemes:
        return f"must be an absolute URL starting with {allowed}, got {_redact(value)!r}"
    if parts.scheme in ("http", "https") and not parts.hostname:
        return f"has no host name: {_redact(value)!r}"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials; use login/password or authToken fields"
    if parts.fragment:
        return "must not have a #fragment"
    if any(c.isspace() for c in value):
        return "must not contain whitespace"
    return None


def _redact(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if parts.password is None and parts.username is None:
        return url
    netloc = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:  # out of range or not a number
        port = None
    if port:
        netloc += f":{port}"
    return parts._replace(netloc=netloc).geturl()


def _is_uuid(key: str) -> bool:
    try:
        return str(uuid.UUID(key)) == key.lower()
    except ValueError:
        return False


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def changes(old: Config, new: Config) -> list[str]:
    """
    What a reload changes, by file, entry and field name; values are never
    shown (some are secrets).
    """
    lines: list[str] = []
    for name, before, after in (
        (SERVERS_FILE, old.servers, new.servers),
        (MODELS_FILE, old.models, new.models),
    ):
        for key in sorted(after.keys() - before.keys()):
            lines.append(f'{name}: entry "{key}" added')
        for key in sorted(before.keys() - after.keys()):
            lines.append(f'{name}: entry "{key}" removed')
        for key in sorted(before.keys() & after.keys()):
            fields = [
                _json_name(f.name)
                for f in dataclass_fields(before[key])
                if getattr(before[key], f.name) != getattr(after[key], f.name)
            ]
            if fields:
                lines.append(f'{name}: entry "{key}" changed: {", ".join(fields)}')
    return lines


def _json_name(attribute: str) -> str:
    first, *rest = attribute.split("_")
    return first + "".join(part.title() for part in rest)
