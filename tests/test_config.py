"""
The config loader (``zhiva.config.load``): every validation of servers.json
and models.json, each problem naming the file, the entry key and the field;
typed, immutable results; secrets that never show; and a property that no
input whatsoever makes ``load`` raise anything but ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zhiva.config import (
    DEFAULT_MODEL_TIMEOUT,
    DEFAULT_PACS_TIMEOUT,
    MODELS_FILE,
    SERVERS_FILE,
    Config,
    ConfigError,
    DataFilterSpec,
    ModelConfig,
    Problem,
    ServerConfig,
    load,
)

SERVER = "6f1c2b1e-8f5d-4e0b-9a51-3c2d1e0f4a7b"
SERVER2 = "0d8a5c3e-1b2f-4c6d-8e9f-a0b1c2d3e4f5"
SERVER3 = "9b7e6d5c-4a3b-4c2d-9e1f-0a1b2c3d4e5f"
MODEL = "2a3b4c5d-6e7f-4a8b-9c0d-1e2f3a4b5c6d"
MODEL2 = "7c8d9e0f-1a2b-4c3d-8e4f-5a6b7c8d9e0f"

PASSWORD = "hunter2-Pa55word"
TOKEN = "tok-8c41e0a7f2d94b1f"

DELETE = object()


def server_entry(**fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"uri": "http://pacs.example:8042/dicom-web", "isDefault": True}
    for name, value in fields.items():
        if value is DELETE:
            entry.pop(name, None)
        else:
            entry[name] = value
    return entry


def model_entry(**fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "uri": "http://model-api:8011/segmentation",
        "task": "segmentation",
        "supports": ["/studies/series"],
    }
    for name, value in fields.items():
        if value is DELETE:
            entry.pop(name, None)
        else:
            entry[name] = value
    return entry


def write(
    directory: Path,
    servers: Any = None,
    models: Any = None,
    *,
    servers_text: str | None = None,
    models_text: str | None = None,
) -> Path:
    """Write both files (valid ones unless told otherwise)."""
    if servers is None:
        servers = {SERVER: server_entry()}
    if models is None:
        models = {MODEL: model_entry()}
    (directory / SERVERS_FILE).write_text(
        servers_text if servers_text is not None else json.dumps(servers), encoding="utf-8"
    )
    (directory / MODELS_FILE).write_text(
        models_text if models_text is not None else json.dumps(models), encoding="utf-8"
    )
    return directory


def problems_of(directory: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load(directory)
    problems = info.value.problems
    assert problems, "ConfigError without problems"
    assert all(isinstance(p, Problem) for p in problems)
    # The exception text lists every problem.
    for problem in problems:
        assert str(problem) in str(info.value)
    return problems


def assert_names(problem: Problem, file: str, key: str | None, field: str | None) -> None:
    assert problem.file == file
    assert problem.key == key
    assert problem.field == field
    text = str(problem)
    assert text.startswith(file)
    if key is not None:
        assert f'entry "{key}"' in text
    if field is not None:
        assert f'field "{field}"' in text


def only_problem(directory: Path, file: str, key: str | None, field: str | None) -> Problem:
    """Exactly one problem, naming ``file``, ``key`` and ``field``."""
    problems = problems_of(directory)
    assert len(problems) == 1, [str(p) for p in problems]
    assert_names(problems[0], file, key, field)
    return problems[0]


def the_problem(problems: list[Problem], file: str, key: str | None, field: str | None) -> Problem:
    matching = [p for p in problems if (p.file, p.key, p.field) == (file, key, field)]
    assert len(matching) == 1, ((file, key, field), [str(p) for p in problems])
    assert_names(matching[0], file, key, field)
    return matching[0]


# --- whole files ----------------------------------------------------------


def test_missing_servers_file(tmp_path: Path) -> None:
    (tmp_path / MODELS_FILE).write_text(json.dumps({MODEL: model_entry()}))
    problem = only_problem(tmp_path, SERVERS_FILE, None, None)
    assert "not found" in problem.message
    assert str(tmp_path.resolve()) in problem.message


def test_missing_models_file(tmp_path: Path) -> None:
    (tmp_path / SERVERS_FILE).write_text(json.dumps({SERVER: server_entry()}))
    problem = only_problem(tmp_path, MODELS_FILE, None, None)
    assert "not found" in problem.message


def test_both_files_missing_reports_both(tmp_path: Path) -> None:
    problems = problems_of(tmp_path)
    assert {p.file for p in problems} == {SERVERS_FILE, MODELS_FILE}
    assert all("not found" in p.message for p in problems)


def test_missing_directory(tmp_path: Path) -> None:
    problems = problems_of(tmp_path / "nope")
    assert {p.file for p in problems} == {SERVERS_FILE, MODELS_FILE}


def test_unreadable_file(tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / SERVERS_FILE).unlink()
    (tmp_path / SERVERS_FILE).mkdir()
    problem = only_problem(tmp_path, SERVERS_FILE, None, None)
    assert "cannot be read" in problem.message


def test_file_not_utf8(tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / MODELS_FILE).write_bytes(b'{"\xff\xfe": 1}')
    problem = only_problem(tmp_path, MODELS_FILE, None, None)
    assert "cannot be read" in problem.message


def test_invalid_json_has_line_and_column(tmp_path: Path) -> None:
    text = '{\n  "%s": {\n    "uri": "http://pacs",,\n  }\n}\n' % SERVER
    write(tmp_path, servers_text=text)
    problem = only_problem(tmp_path, SERVERS_FILE, None, None)
    assert "not valid JSON" in problem.message
    assert "line 3" in problem.message
    assert "column 26" in problem.message


def test_invalid_json_in_models(tmp_path: Path) -> None:
    write(tmp_path, models_text="")
    problem = only_problem(tmp_path, MODELS_FILE, None, None)
    assert "not valid JSON" in problem.message
    assert "line 1 column 1" in problem.message


def test_json_nested_too_deep_is_a_problem(tmp_path: Path) -> None:
    write(tmp_path, servers_text="[" * 100_000 + "]" * 100_000)
    only_problem(tmp_path, SERVERS_FILE, None, None)


def test_json_number_too_long_is_a_problem(tmp_path: Path) -> None:
    write(tmp_path, servers_text='{"%s": {"timeout": %s}}' % (SERVER, "9" * 5000))
    only_problem(tmp_path, SERVERS_FILE, None, None)


@pytest.mark.parametrize(
    "text, kind",
    [("[]", "a list"), ('"x"', "a string"), ("1", "a number"), ("null", "null"), ("true", "a boolean")],
)
@pytest.mark.parametrize("file", [SERVERS_FILE, MODELS_FILE])
def test_top_level_must_be_an_object(tmp_path: Path, file: str, text: str, kind: str) -> None:
    write(tmp_path, **{("servers_text" if file == SERVERS_FILE else "models_text"): text})
    problem = only_problem(tmp_path, file, None, None)
    assert "must be a JSON object" in problem.message
    assert kind in problem.message


def test_empty_objects_are_a_valid_config(tmp_path: Path) -> None:
    config = load(write(tmp_path, servers={}, models={}))
    assert dict(config.servers) == {}
    assert dict(config.models) == {}
    assert config.default_server() is None
    assert config.warnings == ()


# --- entry keys and values ----------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "pacs-1",
        "",
        "6f1c2b1e8f5d4e0b9a513c2d1e0f4a7b",  # no hyphens
        "{6f1c2b1e-8f5d-4e0b-9a51-3c2d1e0f4a7b}",
        "urn:uuid:6f1c2b1e-8f5d-4e0b-9a51-3c2d1e0f4a7b",
        "6f1c2b1e-8f5d-4e0b-9a51-3c2d1e0f4a7",
    ],
)
@pytest.mark.parametrize("file", [SERVERS_FILE, MODELS_FILE])
def test_key_must_be_a_uuid(tmp_path: Path, file: str, key: str) -> None:
    if file == SERVERS_FILE:
        write(tmp_path, servers={key: server_entry()})
    else:
        write(tmp_path, models={key: model_entry()})
    problem = only_problem(tmp_path, file, key, None)
    assert "UUID" in problem.message


@pytest.mark.parametrize("value, kind", [("http://pacs", "a string"), ([], "a list"), (None, "null"), (3, "a number")])
@pytest.mark.parametrize("file", [SERVERS_FILE, MODELS_FILE])
def test_entry_must_be_an_object(tmp_path: Path, file: str, value: Any, kind: str) -> None:
    if file == SERVERS_FILE:
        write(tmp_path, servers={SERVER: value})
    else:
        write(tmp_path, models={MODEL: value})
    key = SERVER if file == SERVERS_FILE else MODEL
    problem = only_problem(tmp_path, file, key, None)
    assert "must be a JSON object" in problem.message
    assert kind in problem.message


# --- servers.json fields --------------------------------------------------

SERVER_CASES = [
    # (fields, field, fragment of the message)
    ({"uri": DELETE}, "uri", "is required"),
    ({"uri": ""}, "uri", "must not be empty"),
    ({"uri": 42}, "uri", "must be a string"),
    ({"uri": "/dicom-web"}, "uri", "absolute URL"),
    ({"uri": "pacs.example/dicom-web"}, "uri", "absolute URL"),
    ({"uri": "ftp://pacs.example/dicom-web"}, "uri", "absolute URL"),
    ({"uri": "http:///dicom-web"}, "uri", "no host"),
    ({"uri": "http://orthanc:secretpw@pacs.example/dicom-web"}, "uri", "credentials"),
    ({"uri": "https://orthanc@pacs.example/dicom-web"}, "uri", "credentials"),
    ({"uri": "http://pacs.example/dicom-web#part"}, "uri", "fragment"),
    ({"uri": "http://pacs.example/dicom web"}, "uri", "whitespace"),
    ({"uri": "http://[::1/dicom-web"}, "uri", "not a valid URL"),
    ({"statusUri": "ftp://pacs.example/status"}, "statusUri", "absolute URL"),
    ({"statusUri": "http://u:p@pacs.example/status"}, "statusUri", "credentials"),
    ({"isDefault": "yes"}, "isDefault", "true or false"),
    ({"isDefault": 1}, "isDefault", "true or false"),
    ({"authType": "kerberos"}, "authType", "unknown auth type"),
    ({"authType": 7}, "authType", "must be a string"),
    ({"authType": "basicAuth", "password": PASSWORD}, "login", "is required for authType"),
    ({"authType": "basicAuth", "login": "", "password": PASSWORD}, "login", "is required for authType"),
    ({"authType": "basicAuth", "login": "orthanc"}, "password", "is required for authType"),
    ({"authType": "basicAuth", "login": "orthanc", "password": ""}, "password", "is required"),
    ({"login": ["orthanc"]}, "login", "must be a string"),
    ({"password": 1234}, "password", '{"env": "VARIABLE"}'),
    ({"password": {"env": "A", "file": "b"}}, "password", '{"env": "VARIABLE"}'),
    ({"authToken": {"env": 3}}, "authToken", '{"env": "VARIABLE"}'),
    ({"authToken": ["x"]}, "authToken", '{"env": "VARIABLE"}'),
    ({"signInServer": "sign-in"}, "signInServer", "absolute URL"),
    ({"signInTokenServer": "ftp://auth/token"}, "signInTokenServer", "absolute URL"),
    ({"refreshServer": "http://auth/refresh#x"}, "refreshServer", "fragment"),
    ({"timeout": 0}, "timeout", "seconds"),
    ({"timeout": -5}, "timeout", "seconds"),
    ({"timeout": "60"}, "timeout", "seconds"),
    ({"timeout": True}, "timeout", "seconds"),
    ({"timeout": 86401}, "timeout", "seconds"),
    ({"timeout": [1]}, "timeout", "seconds"),
    ({"caFile": "no-such-ca.pem"}, "caFile", "does not exist"),
    ({"caFile": "x" * 300}, "caFile", "does not exist"),
    ({"caFile": "bad\x00name"}, "caFile", "does not exist"),
    ({"caFile": 5}, "caFile", "must be a string"),
    ({"tlsVerify": "false"}, "tlsVerify", "true or false"),
]


@pytest.mark.parametrize("fields, field, fragment", SERVER_CASES)
def test_server_field_validation(tmp_path: Path, fields: dict, field: str, fragment: str) -> None:
    write(tmp_path, servers={SERVER: server_entry(**fields)})
    problem = only_problem(tmp_path, SERVERS_FILE, SERVER, field)
    assert fragment in problem.message


def test_uri_credentials_are_not_echoed(tmp_path: Path) -> None:
    write(
        tmp_path,
        servers={
            SERVER: server_entry(uri=f"http://orthanc:{PASSWORD}@pacs.example/dicom-web"),
            SERVER2: server_entry(uri=f"ftp://orthanc:{PASSWORD}@pacs.example/x", isDefault=False),
            SERVER3: server_entry(uri=f"http://orthanc:{PASSWORD}@:99999/x", isDefault=False),
        },
    )
    problems = problems_of(tmp_path)
    assert len(problems) == 3
    for key in (SERVER, SERVER2, SERVER3):
        the_problem(problems, SERVERS_FILE, key, "uri")
    for problem in problems:
        assert PASSWORD not in str(problem)


def test_server_uri_trailing_slash_is_stripped(tmp_path: Path) -> None:
    config = load(write(tmp_path, servers={SERVER: server_entry(uri="https://pacs.example/dicom-web/")}))
    assert config.servers[SERVER].uri == "https://pacs.example/dicom-web"


def test_several_defaults_name_every_default(tmp_path: Path) -> None:
    write(
        tmp_path,
        servers={
            SERVER: server_entry(),
            SERVER2: server_entry(uri="http://other:8042/dicom-web"),
            SERVER3: server_entry(uri="http://third:8042/dicom-web", isDefault=False),
        },
    )
    problems = problems_of(tmp_path)
    assert len(problems) == 2
    for key in (SERVER, SERVER2):
        problem = the_problem(problems, SERVERS_FILE, key, "isDefault")
        assert "more than one default" in problem.message
        assert SERVER in problem.message and SERVER2 in problem.message
        assert SERVER3 not in problem.message


def test_default_server(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            servers={
                SERVER: server_entry(isDefault=False),
                SERVER2: server_entry(uri="http://default:8042/dicom-web"),
            },
        )
    )
    default = config.default_server()
    assert default is config.servers[SERVER2]
    assert default.key == SERVER2


def test_no_default_server(tmp_path: Path) -> None:
    config = load(write(tmp_path, servers={SERVER: server_entry(isDefault=DELETE)}))
    assert config.servers[SERVER].is_default is False
    assert config.default_server() is None


# --- models.json fields ---------------------------------------------------

MODEL_CASES = [
    ({"uri": DELETE}, "uri", "is required"),
    ({"uri": ""}, "uri", "must not be empty"),
    ({"uri": None}, "uri", "is required"),
    ({"uri": 8011}, "uri", "must be a string"),
    ({"uri": "/segmentation"}, "uri", "absolute URL"),
    ({"uri": "ftp://model-api/segmentation"}, "uri", "absolute URL"),
    ({"uri": "file:///srv/models/seg"}, "uri", "http://"),
    ({"uri": "ws://model-api/segmentation"}, "uri", "https://"),
    ({"uri": "http://user:pw@model-api/segmentation"}, "uri", "credentials"),
    ({"uri": "http://model-api/segmentation#x"}, "uri", "fragment"),
    ({"uri": "plugin:no-such-model"}, "uri", "no in-process model plugin"),
    ({"statusUri": "status"}, "statusUri", "absolute URL"),
    ({"task": DELETE}, "task", "is required"),
    ({"task": "classification"}, "task", "must be one of"),
    ({"task": 3}, "task", "must be a string"),
    ({"supports": DELETE}, "supports", "is required"),
    ({"supports": []}, "supports", "non-empty list"),
    ({"supports": "/studies"}, "supports", "non-empty list"),
    ({"supports": {"/studies": True}}, "supports", "non-empty list"),
    ({"supports": ["/patients"]}, "supports", "unknown level"),
    ({"supports": ["/studies", 3]}, "supports", "unknown level"),
    ({"supports": [["/studies"]]}, "supports", "unknown level"),
    ({"supports": [{"level": "/studies"}]}, "supports", "unknown level"),
    ({"supports": ["/studies", "/studies"]}, "supports", "twice"),
    ({"protocol": "grpc"}, "protocol", "unknown protocol"),
    ({"protocol": 1}, "protocol", "must be a string"),
    ({"timeout": 0}, "timeout", "seconds"),
    ({"timeout": -1.5}, "timeout", "seconds"),
    ({"timeout": "600"}, "timeout", "seconds"),
    ({"timeout": False}, "timeout", "seconds"),
    ({"caFile": "missing-ca.pem"}, "caFile", "does not exist"),
    ({"tlsVerify": 0}, "tlsVerify", "true or false"),
    ({"dataFilter": "image"}, "dataFilter", "must be a list"),
    ({"dataFilter": {"dataKey": "image", "title": "Image"}}, "dataFilter", "must be a list"),
    ({"dataFilter": ["image"]}, "dataFilter[0]", "must be an object"),
    ({"dataFilter": [{"title": "Image"}]}, "dataFilter[0].dataKey", "letters, digits and hyphens"),
    ({"dataFilter": [{"dataKey": "", "title": "Image"}]}, "dataFilter[0].dataKey", "letters"),
    ({"dataFilter": [{"dataKey": "ct image", "title": "Image"}]}, "dataFilter[0].dataKey", "letters"),
    ({"dataFilter": [{"dataKey": "ct_image", "title": "Image"}]}, "dataFilter[0].dataKey", "letters"),
    ({"dataFilter": [{"dataKey": "ct/image", "title": "Image"}]}, "dataFilter[0].dataKey", "letters"),
    ({"dataFilter": [{"dataKey": "ct\n", "title": "Image"}]}, "dataFilter[0].dataKey", "letters"),
    ({"dataFilter": [{"dataKey": 5, "title": "Image"}]}, "dataFilter[0].dataKey", "letters"),
    ({"dataFilter": [{"dataKey": "ct"}]}, "dataFilter[0].title", "non-empty string"),
    ({"dataFilter": [{"dataKey": "ct", "title": ""}]}, "dataFilter[0].title", "non-empty string"),
    ({"dataFilter": [{"dataKey": "ct", "title": ["CT"]}]}, "dataFilter[0].title", "non-empty string"),
    (
        {"dataFilter": [{"dataKey": "ct", "title": "CT", "description": 3}]},
        "dataFilter[0].description",
        "must be a string",
    ),
    (
        {"dataFilter": [{"dataKey": "ct", "title": "CT"}, {"dataKey": "ct", "title": "CT again"}]},
        "dataFilter[1].dataKey",
        "used twice",
    ),
    (
        {"dataFilter": [{"dataKey": "ct", "title": "CT", "dataFilter": "x"}]},
        "dataFilter[0].dataFilter",
        "must be a list",
    ),
    (
        {
            "dataFilter": [
                {"dataKey": "ct", "title": "CT"},
                {"dataKey": "pet", "title": "PET", "dataFilter": [{"dataKey": "bad key!", "title": "t"}]},
            ]
        },
        "dataFilter[1].dataFilter[0].dataKey",
        "letters",
    ),
    (
        {
            "dataFilter": [
                {
                    "dataKey": "a",
                    "title": "A",
                    "dataFilter": [
                        {"dataKey": "b", "title": "B"},
                        {"dataKey": "c", "title": "C", "dataFilter": [{"dataKey": "d"}]},
                    ],
                }
            ]
        },
        "dataFilter[0].dataFilter[1].dataFilter[0].title",
        "non-empty string",
    ),
    (
        {
            "dataFilter": [
                {
                    "dataKey": "a",
                    "title": "A",
                    "dataFilter": [{"dataKey": "b", "title": "B"}, {"dataKey": "b", "title": "B2"}],
                }
            ]
        },
        "dataFilter[0].dataFilter[1].dataKey",
        "used twice",
    ),
]


@pytest.mark.parametrize("fields, field, fragment", MODEL_CASES)
def test_model_field_validation(tmp_path: Path, fields: dict, field: str, fragment: str) -> None:
    write(tmp_path, models={MODEL: model_entry(**fields)})
    problem = only_problem(tmp_path, MODELS_FILE, MODEL, field)
    assert fragment in problem.message


def test_same_data_key_in_different_branches_is_fine(tmp_path: Path) -> None:
    data_filter = [
        {"dataKey": "a", "title": "A", "dataFilter": [{"dataKey": "x", "title": "X"}]},
        {"dataKey": "b", "title": "B", "dataFilter": [{"dataKey": "x", "title": "X"}]},
    ]
    config = load(write(tmp_path, models={MODEL: model_entry(dataFilter=data_filter)}))
    assert [s.data_filter[0].data_key for s in config.models[MODEL].data_filter] == ["x", "x"]


def test_several_data_filter_problems_are_all_reported(tmp_path: Path) -> None:
    data_filter = [
        "x",
        {"dataKey": "ok", "title": "OK", "dataFilter": [{"dataKey": "a b", "title": "t"}, 3]},
        {"dataKey": "ok", "title": "dup"},
    ]
    write(tmp_path, models={MODEL: model_entry(dataFilter=data_filter)})
    problems = problems_of(tmp_path)
    assert sorted(p.field for p in problems) == sorted(
        [
            "dataFilter[0]",
            "dataFilter[1].dataFilter[0].dataKey",
            "dataFilter[1].dataFilter[1]",
            "dataFilter[2].dataKey",
        ]
    )
    for problem in problems:
        assert_names(problem, MODELS_FILE, MODEL, problem.field)


# --- warnings ------------------------------------------------------------


def test_tls_verify_false_is_a_warning_not_an_error(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            servers={SERVER: server_entry(uri="https://pacs.example/dicom-web", tlsVerify=False)},
            models={MODEL: model_entry(uri="https://model-api/seg", tlsVerify=False)},
        )
    )
    assert config.servers[SERVER].tls_verify is False
    assert config.models[MODEL].tls_verify is False
    assert len(config.warnings) == 2
    server_warning = next(w for w in config.warnings if w.startswith(SERVERS_FILE))
    model_warning = next(w for w in config.warnings if w.startswith(MODELS_FILE))
    assert f'entry "{SERVER}"' in server_warning and "tlsVerify" in server_warning
    assert f'entry "{MODEL}"' in model_warning and "tlsVerify" in model_warning


def test_tls_verify_true_gives_no_warning(tmp_path: Path) -> None:
    config = load(write(tmp_path, servers={SERVER: server_entry(tlsVerify=True)}))
    assert config.servers[SERVER].tls_verify is True
    assert config.warnings == ()


def test_unknown_fields_are_warnings_not_errors(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            servers={SERVER: server_entry(colour="blue", Uri="http://typo")},
            models={
                MODEL: model_entry(
                    name="Lung segmentation",
                    dataFilter=[{"dataKey": "ct", "title": "CT", "colour": "red"}],
                )
            },
        )
    )
    assert set(config.servers) == {SERVER}
    assert set(config.models) == {MODEL}
    expected = [
        (SERVERS_FILE, SERVER, "colour"),
        (SERVERS_FILE, SERVER, "Uri"),
        (MODELS_FILE, MODEL, "name"),
        (MODELS_FILE, MODEL, "dataFilter[0].colour"),
    ]
    assert len(config.warnings) == len(expected), config.warnings
    for file, key, field in expected:
        assert any(
            w.startswith(file) and f'entry "{key}"' in w and f'unknown field "{field}"' in w
            for w in config.warnings
        ), (file, key, field, config.warnings)


def test_known_fields_are_not_reported_as_unknown(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    config = load(
        write(
            tmp_path,
            servers={
                SERVER: server_entry(
                    statusUri="http://pacs.example/status",
                    authType="basicAuth",
                    login="orthanc",
                    password=PASSWORD,
                    authToken=TOKEN,
                    signInServer="http://auth/sign-in",
                    signInTokenServer="http://auth/token",
                    refreshServer="http://auth/refresh",
                    caFile="ca.pem",
                    tlsVerify=True,
                    timeout=30,
                ),
                SERVER2: server_entry(isDefault=False, token=TOKEN),
            },
            models={
                MODEL: model_entry(
                    statusUri="http://model-api/status",
                    dataFilter=[{"dataKey": "ct", "title": "CT", "description": "d", "dataFilter": []}],
                    protocol="zhiva-json",
                    caFile="ca.pem",
                    tlsVerify=True,
                    timeout=30,
                )
            },
        )
    )
    assert config.warnings == ()


def test_warnings_do_not_hide_errors(tmp_path: Path) -> None:
    write(tmp_path, servers={SERVER: server_entry(colour="blue", timeout=-1)})
    only_problem(tmp_path, SERVERS_FILE, SERVER, "timeout")


# --- everything at once -----------------------------------------------------


def test_all_problems_in_both_files_are_reported_at_once(tmp_path: Path) -> None:
    write(
        tmp_path,
        servers={
            SERVER: server_entry(uri="ftp://pacs", timeout=0, authType="basicAuth"),
            SERVER2: server_entry(isDefault="no"),
            "not-a-uuid": server_entry(),
        },
        models={
            MODEL: model_entry(task="classify", supports=[]),
            MODEL2: model_entry(protocol="grpc", dataFilter=[{"dataKey": "a", "title": "A"}, {"dataKey": "a"}]),
        },
    )
    problems = problems_of(tmp_path)
    expected = {
        (SERVERS_FILE, SERVER, "uri"),
        (SERVERS_FILE, SERVER, "timeout"),
        (SERVERS_FILE, SERVER, "login"),
        (SERVERS_FILE, SERVER, "password"),
        (SERVERS_FILE, SERVER2, "isDefault"),
        (SERVERS_FILE, "not-a-uuid", None),
        (MODELS_FILE, MODEL, "task"),
        (MODELS_FILE, MODEL, "supports"),
        (MODELS_FILE, MODEL2, "protocol"),
        (MODELS_FILE, MODEL2, "dataFilter[1].title"),
    }
    assert {(p.file, p.key, p.field) for p in problems} == expected
    assert len(problems) == len(expected)
    for file, key, field in expected:
        the_problem(problems, file, key, field)


def test_broken_servers_file_still_checks_models(tmp_path: Path) -> None:
    write(tmp_path, servers_text="{", models={MODEL: model_entry(task="x")})
    problems = problems_of(tmp_path)
    the_problem(problems, SERVERS_FILE, None, None)
    the_problem(problems, MODELS_FILE, MODEL, "task")


# --- a valid config -------------------------------------------------------


def test_valid_config_has_typed_values(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    config = load(
        write(
            tmp_path,
            servers={
                SERVER: {
                    "uri": "https://pacs.example:8043/dicom-web/",
                    "isDefault": True,
                    "statusUri": "https://pacs.example:8043/system",
                    "authType": "basicAuth",
                    "login": "orthanc",
                    "password": PASSWORD,
                    "caFile": "certs/ca.pem",
                    "timeout": 15,
                },
                SERVER2: {"uri": "http://other:8042/dicom-web"},
            },
            models={
                MODEL: {
                    "uri": "http://model-api:8011/segmentation",
                    "task": "segmentation",
                    "supports": ["/studies/series", "/studies"],
                    "statusUri": "http://model-api:8011/status",
                    "dataFilter": [
                        {"dataKey": "ct", "title": "CT series", "description": "Chest CT"},
                        {
                            "dataKey": "pet-1",
                            "title": "PET",
                            "dataFilter": [{"dataKey": "ATTN", "title": "Attenuation"}],
                        },
                    ],
                    "timeout": 2.5,
                },
                MODEL2: {
                    "uri": "https://model-api/predict",
                    "task": "prediction",
                    "supports": ["/studies/series/instances"],
                    "protocol": "zhiva-json",
                },
            },
        )
    )
    assert isinstance(config, Config)
    assert config.directory == tmp_path
    assert config.warnings == ()
    assert set(config.servers) == {SERVER, SERVER2}
    assert set(config.models) == {MODEL, MODEL2}

    pacs = config.servers[SERVER]
    assert isinstance(pacs, ServerConfig)
    assert pacs.key == SERVER
    assert pacs.uri == "https://pacs.example:8043/dicom-web"
    assert pacs.is_default is True
    assert pacs.status_uri == "https://pacs.example:8043/system"
    assert pacs.auth_type == "basicAuth"
    assert pacs.login == "orthanc"
    assert pacs.password is not None and pacs.password.reveal() == PASSWORD
    assert pacs.auth_token is None
    assert pacs.ca_file == tmp_path / "certs" / "ca.pem"
    assert isinstance(pacs.ca_file, Path)
    assert pacs.tls_verify is True
    assert pacs.timeout == 15.0 and isinstance(pacs.timeout, float)

    other = config.servers[SERVER2]
    assert other.is_default is False
    assert other.auth_type == ""
    assert other.login is None and other.password is None and other.auth_token is None
    assert other.status_uri is None
    assert other.sign_in_server is None and other.sign_in_token_server is None
    assert other.refresh_server is None
    assert other.ca_file is None
    assert other.tls_verify is True
    assert other.timeout == DEFAULT_PACS_TIMEOUT == 60.0
    assert config.default_server() is pacs

    seg = config.models[MODEL]
    assert isinstance(seg, ModelConfig)
    assert seg.key == MODEL
    assert seg.uri == "http://model-api:8011/segmentation"
    assert seg.plugin is None
    assert seg.task == "segmentation"
    assert seg.supports == frozenset({"/studies", "/studies/series"})
    assert isinstance(seg.supports, frozenset)
    assert seg.status_uri == "http://model-api:8011/status"
    assert seg.data_filter == (
        DataFilterSpec("ct", "CT series", "Chest CT", ()),
        DataFilterSpec("pet-1", "PET", None, (DataFilterSpec("ATTN", "Attenuation"),)),
    )
    assert isinstance(seg.data_filter, tuple)
    assert isinstance(seg.data_filter[1].data_filter, tuple)
    assert seg.protocol == "zhiva-json"
    assert seg.ca_file is None
    assert seg.tls_verify is True
    assert seg.timeout == 2.5

    predict = config.models[MODEL2]
    assert predict.task == "prediction"
    assert predict.supports == frozenset({"/studies/series/instances"})
    assert predict.data_filter == ()
    assert predict.protocol == "zhiva-json"
    assert predict.status_uri is None
    assert predict.timeout == DEFAULT_MODEL_TIMEOUT == 600.0


@pytest.mark.parametrize("task", ["segmentation", "annotation", "prediction"])
def test_every_task_is_accepted(tmp_path: Path, task: str) -> None:
    config = load(write(tmp_path, models={MODEL: model_entry(task=task)}))
    assert config.models[MODEL].task == task


def test_empty_protocol_means_default(tmp_path: Path) -> None:
    config = load(write(tmp_path, models={MODEL: model_entry(protocol="")}))
    assert config.models[MODEL].protocol == "zhiva-json"


def test_uppercase_uuid_key_is_accepted(tmp_path: Path) -> None:
    config = load(write(tmp_path, servers={SERVER.upper(): server_entry()}))
    assert set(config.servers) == {SERVER.upper()}


def test_ca_file_is_relative_to_config_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    (config_dir / "ca.pem").write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load(write(config_dir, models={MODEL: model_entry(caFile="ca.pem")}))
    assert config.models[MODEL].ca_file == config_dir / "ca.pem"


def test_config_is_immutable(tmp_path: Path) -> None:
    config = load(write(tmp_path, models={MODEL: model_entry(dataFilter=[{"dataKey": "ct", "title": "CT"}])}))
    server = config.servers[SERVER]
    model = config.models[MODEL]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.servers = {}  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.warnings = ("x",)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        server.uri = "http://evil"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        server.is_default = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.task = "prediction"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.data_filter[0].title = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.servers[SERVER2] = server  # type: ignore[index]
    with pytest.raises(TypeError):
        del config.servers[SERVER]  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        config.models[MODEL2] = model  # type: ignore[index]
    with pytest.raises(AttributeError):
        model.supports.add("/studies")  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        model.data_filter[0] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        server.password = None  # type: ignore[misc]
    assert set(config.servers) == {SERVER}
    assert config.servers[SERVER].uri == "http://pacs.example:8042/dicom-web"


# --- secrets -------------------------------------------------------------


def assert_hidden(config: Config, *secrets: str) -> None:
    shown = [repr(config.servers), repr(config), str(dict(config.servers))]
    for server in config.servers.values():
        shown += [repr(server), str(server), repr(server.password), str(server.auth_token)]
    shown += list(config.warnings)
    for text in shown:
        for secret in secrets:
            assert secret not in text, text


def test_inline_secrets_never_show(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            servers={
                SERVER: server_entry(authType="basicAuth", login="orthanc", password=PASSWORD, authToken=TOKEN)
            },
        )
    )
    server = config.servers[SERVER]
    assert server.password.reveal() == PASSWORD
    assert server.auth_token.reveal() == TOKEN
    assert_hidden(config, PASSWORD, TOKEN)
    assert "orthanc" in repr(server)  # the login is not a secret


def test_secret_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZHIVA_TEST_PACS_PASSWORD", PASSWORD)
    monkeypatch.setenv("ZHIVA_TEST_PACS_TOKEN", TOKEN)
    config = load(
        write(
            tmp_path,
            servers={
                SERVER: server_entry(
                    authType="basicAuth",
                    login="orthanc",
                    password={"env": "ZHIVA_TEST_PACS_PASSWORD"},
                    authToken={"env": "ZHIVA_TEST_PACS_TOKEN"},
                )
            },
        )
    )
    server = config.servers[SERVER]
    assert server.password.reveal() == PASSWORD
    assert server.auth_token.reveal() == TOKEN
    assert_hidden(config, PASSWORD, TOKEN)


def test_secret_env_var_missing_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZHIVA_TEST_UNSET_VARIABLE", raising=False)
    write(
        tmp_path,
        servers={
            SERVER: server_entry(
                authType="basicAuth", login="orthanc", password={"env": "ZHIVA_TEST_UNSET_VARIABLE"}
            )
        },
    )
    problems = problems_of(tmp_path)
    problem = the_problem(problems, SERVERS_FILE, SERVER, "password")
    assert "ZHIVA_TEST_UNSET_VARIABLE" in problem.message
    assert "not set" in problem.message


def test_secret_env_var_name_unencodable_is_a_problem(tmp_path: Path) -> None:
    write(tmp_path, servers={SERVER: server_entry(authToken={"env": "\ud800"})})
    only_problem(tmp_path, SERVERS_FILE, SERVER, "authToken")


def test_secret_from_file_relative_to_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir = tmp_path / "conf"
    (config_dir / "secrets").mkdir(parents=True)
    (config_dir / "secrets" / "pacs-password").write_text(PASSWORD + "\n")
    (config_dir / "token.txt").write_text(TOKEN + "\r\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load(
        write(
            config_dir,
            servers={
                SERVER: server_entry(
                    authType="basicAuth",
                    login="orthanc",
                    password={"file": "secrets/pacs-password"},
                    authToken={"file": "token.txt"},
                )
            },
        )
    )
    server = config.servers[SERVER]
    assert server.password.reveal() == PASSWORD
    assert server.auth_token.reveal() == TOKEN
    assert_hidden(config, PASSWORD, TOKEN)


def test_secret_from_absolute_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "outside" / "pw"
    secret_file.parent.mkdir()
    secret_file.write_text(PASSWORD)
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    config = load(write(config_dir, servers={SERVER: server_entry(password={"file": str(secret_file)})}))
    assert config.servers[SERVER].password.reveal() == PASSWORD


@pytest.mark.parametrize("name", ["missing-token.txt", "", "secrets-dir", "bad\x00name", "\ud800", "n" * 300])
def test_secret_file_unreadable_is_a_problem(tmp_path: Path, name: str) -> None:
    (tmp_path / "secrets-dir").mkdir()
    write(tmp_path, servers={SERVER: server_entry(authToken={"file": name})})
    problem = only_problem(tmp_path, SERVERS_FILE, SERVER, "authToken")
    assert "cannot be read" in problem.message


def test_secret_file_not_utf8_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "pw").write_bytes(b"\xff\xfe\xfa")
    write(tmp_path, servers={SERVER: server_entry(password={"file": "pw"})})
    only_problem(tmp_path, SERVERS_FILE, SERVER, "password")


def test_secret_problems_do_not_show_the_secret(tmp_path: Path) -> None:
    write(
        tmp_path,
        servers={SERVER: server_entry(authType="basicAuth", password=PASSWORD, authToken=TOKEN, timeout=-1)},
    )
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert PASSWORD not in str(info.value) and TOKEN not in str(info.value)
    assert PASSWORD not in repr(info.value.problems) and TOKEN not in repr(info.value.problems)


def test_older_token_field_is_auth_token(tmp_path: Path) -> None:
    config = load(write(tmp_path, servers={SERVER: server_entry(token=TOKEN)}))
    server = config.servers[SERVER]
    assert server.auth_token is not None
    assert server.auth_token.reveal() == TOKEN
    assert config.warnings == ()
    assert_hidden(config, TOKEN)


def test_older_token_field_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZHIVA_TEST_TOKEN", TOKEN)
    config = load(write(tmp_path, servers={SERVER: server_entry(token={"env": "ZHIVA_TEST_TOKEN"})}))
    assert config.servers[SERVER].auth_token.reveal() == TOKEN


def test_auth_token_wins_over_older_token(tmp_path: Path) -> None:
    config = load(write(tmp_path, servers={SERVER: server_entry(authToken=TOKEN, token="older")}))
    assert config.servers[SERVER].auth_token.reveal() == TOKEN


def test_older_token_field_problem_names_token(tmp_path: Path) -> None:
    write(tmp_path, servers={SERVER: server_entry(token=42)})
    only_problem(tmp_path, SERVERS_FILE, SERVER, "token")


# --- no input crashes the loader -------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and Infinity: Python's json writes and reads them
    st.text(max_size=20),
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
UUIDS = st.uuids().map(str) | st.sampled_from([SERVER, SERVER.upper(), "not-a-uuid"])

URLS = st.sampled_from(
    [
        "http://pacs",
        "https://pacs:8043/dicom-web/",
        "http://",
        "http:///x",
        "/relative",
        "ftp://u:p@h:bad/",
        "http://u:p@:99999/",
        "http://[::1",
        "http://h/#f",
        "file:///srv/dicom",
        "plugin:x",
        "plugin:",
        "http://h\u2100x/",
        "",
        " ",
    ]
) | st.text(max_size=30)
FILE_NAMES = st.sampled_from(
    ["", "missing", "sub", "secret", "\x00", "\ud800", "x" * 300, "../nope", "/nonexistent/x", "sub/../secret"]
) | st.text(max_size=20).filter(lambda s: not s.startswith("/"))
SECRETS = st.one_of(
    st.text(max_size=10),
    st.fixed_dictionaries({"env": st.text(max_size=10) | st.sampled_from(["HOME", "PATH", "\ud800"])}),
    st.fixed_dictionaries({"file": FILE_NAMES}),
    st.dictionaries(st.sampled_from(["env", "file", "x"]), JSON, max_size=2),
    JSON,
)
LEVEL_VALUES = st.sampled_from(["/studies", "/studies/series", "/studies/series/instances", "/x"]) | JSON
DATA_FILTERS = st.recursive(
    st.lists(JSON, max_size=2) | JSON,
    lambda children: st.lists(
        st.dictionaries(
            st.sampled_from(["dataKey", "title", "description", "dataFilter", "other"]),
            st.sampled_from(["ct", "ct\n", "a b", "", "T"]) | JSON | children,
            max_size=5,
        ),
        max_size=3,
    ),
    max_leaves=10,
)

SERVER_FIELDS = {
    "uri": URLS,
    "isDefault": st.booleans() | JSON,
    "statusUri": URLS,
    "authType": st.sampled_from(["", "basicAuth", "token", "zhivaAuth"]) | JSON,
    "login": st.text(max_size=5) | JSON,
    "password": SECRETS,
    "authToken": SECRETS,
    "token": SECRETS,
    "signInServer": URLS,
    "signInTokenServer": URLS,
    "refreshServer": URLS,
    "caFile": FILE_NAMES | JSON,
    "tlsVerify": st.booleans() | JSON,
    "timeout": st.floats() | st.integers() | JSON,
    "unknown": JSON,
}
MODEL_FIELDS = {
    "uri": URLS,
    "task": st.sampled_from(["segmentation", "annotation", "prediction", "x"]) | JSON,
    "supports": st.lists(LEVEL_VALUES, max_size=4) | JSON,
    "statusUri": URLS,
    "dataFilter": DATA_FILTERS,
    "protocol": st.sampled_from(["", "zhiva-json", "grpc"]) | JSON,
    "caFile": FILE_NAMES | JSON,
    "tlsVerify": st.booleans() | JSON,
    "timeout": st.floats() | st.integers() | JSON,
    "other": JSON,
}


def entries(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    entry = st.fixed_dictionaries({}, optional=fields)
    return st.dictionaries(UUIDS, entry | JSON, max_size=3)


def load_or_config_error(servers_text: str, models_text: str) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        (directory / "sub").mkdir()
        (directory / "secret").write_text("s3cret\n")
        (directory / SERVERS_FILE).write_text(servers_text, encoding="utf-8")
        (directory / MODELS_FILE).write_text(models_text, encoding="utf-8")
        try:
            config = load(directory)
        except ConfigError as e:
            assert e.problems
            for problem in e.problems:
                assert isinstance(problem, Problem)
                assert problem.file in (SERVERS_FILE, MODELS_FILE)
                str(problem)
        else:
            assert isinstance(config, Config)
            for server in config.servers.values():
                repr(server)
            for model in config.models.values():
                assert isinstance(model.supports, frozenset)


VALID_MODELS = json.dumps({MODEL: model_entry()})
VALID_SERVERS = json.dumps({SERVER: server_entry()})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(servers=JSON | entries(SERVER_FIELDS))
def test_any_servers_json_loads_or_raises_config_error(servers: Any) -> None:
    load_or_config_error(json.dumps(servers), VALID_MODELS)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models=JSON | entries(MODEL_FIELDS))
def test_any_models_json_loads_or_raises_config_error(models: Any) -> None:
    load_or_config_error(VALID_SERVERS, json.dumps(models))


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
def test_any_servers_text_loads_or_raises_config_error(text: str) -> None:
    load_or_config_error(text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), VALID_MODELS)


def test_relative_folder_uri_is_a_config_error(tmp_path):
    key = "16161616-1616-4161-8161-161616161616"
    (tmp_path / "servers.json").write_text(json.dumps({key: {"uri": "file:demo/dicom"}}))
    (tmp_path / "models.json").write_text("{}")

    with pytest.raises(ConfigError) as error:
        load(tmp_path)

    (problem,) = error.value.problems
    assert (problem.file, problem.key, problem.field) == ("servers.json", key, "uri")
