"""
Session fixtures for the real servers the proxy talks to: a synthetic study,
Orthanc PACSes holding it, and a model API. They are expensive, so each is
started once per session; they run outside the reactor (plain subprocess and
urllib).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dicomgen import StudyInfo, make_study
from tests.support.model_server import ModelServer
from tests.support.orthanc import Orthanc

#: The one user of ``orthanc_auth``.
AUTH_USERS = {"alice": "s3cret-pw"}


@pytest.fixture(scope="session")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyInfo:
    """One CT study: 120 slices of 512x512 plus a 3-slice 64x64 series."""
    return make_study(tmp_path_factory.mktemp("study"))


def _orthanc(users: dict[str, str] | None, paths: list[Path]) -> Iterator[Orthanc]:
    """Start an Orthanc holding ``paths``, or skip when it is not installed."""
    missing = Orthanc.available()
    if missing is not None:
        pytest.skip(f"Orthanc tests need Orthanc with DICOMweb: {missing}")
    server = Orthanc(users=users)
    server.start()
    try:
        server.upload(paths)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def orthanc(study: StudyInfo) -> Iterator[Orthanc]:
    """An Orthanc without auth holding the whole ``study``."""
    yield from _orthanc(None, study.files)


@pytest.fixture(scope="session")
def orthanc_auth(study: StudyInfo) -> Iterator[Orthanc]:
    """An Orthanc with basic auth (``AUTH_USERS``) holding only the small series."""
    yield from _orthanc(AUTH_USERS, study.series_files(study.small_series_uid))


@pytest.fixture(scope="session")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """The zhiva-json model API of ``tests/support/model_server.py``."""
    server = ModelServer(tmp_path_factory.mktemp("model"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
