"""
The folder source answers the proxy exactly as a DICOMweb PACS does: the
same requests through a real Orthanc and through a folder holding the same
files give the model the same instances, and the same 404s.
"""
from __future__ import annotations

import json
import shutil

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from tests.conftest import AUTH_USERS
from tests.support.proxy import make_certificate, start_proxy, write_config

ORTHANC = "13131313-1313-4131-8131-131313131313"
FOLDER = "14141414-1414-4141-8141-141414141414"
MODEL = "dddddddd-0000-4000-8000-000000000001"
FILTERED = "dddddddd-0000-4000-8000-000000000002"
LEVELS = ["/studies", "/studies/series", "/studies/series/instances"]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, study, orthanc_auth, model_server):
    tmp = tmp_path_factory.mktemp("alike")
    folder = tmp / "dicom" / "nested"
    folder.mkdir(parents=True)
    for path in study.series_files(study.small_series_uid):  # what orthanc_auth holds
        shutil.copy(path, folder / path.name)
    user, password = next(iter(AUTH_USERS.items()))
    config = write_config(
        tmp / "config",
        {
            ORTHANC: {"uri": orthanc_auth.dicomweb, "authType": "basicAuth",
                      "login": user, "password": password},
            FOLDER: {"uri": (tmp / "dicom").as_uri()},
        },
        {
            MODEL: {"uri": model_server.url + "/prediction", "task": "prediction", "supports": LEVELS},
            FILTERED: {"uri": model_server.url + "/prediction", "task": "prediction", "supports": LEVELS,
                       "dataFilter": [{"dataKey": "ct", "title": "CT",
                                       "dataFilter": [{"dataKey": "one", "title": "One slice"}]}]},
        },
    )
    running = start_proxy(reactor, config, *make_certificate(tmp))
    yield running
    pytest_twisted.blockon(ensureDeferred(running.stop()))


def _cases(study):
    small = study.small_series_uid
    sop = study.series[small][1]
    base = f"/predictions/{MODEL}/studies/{study.study_uid}"
    filters = json.dumps([{"dataKey": "ct", "uuid": small, "dataFilter": [{"dataKey": "one", "uuid": sop}]}])
    return {
        "study": (base, {}),
        "series": (f"{base}/series/{small}", {}),
        "instance": (f"{base}/series/{small}/instances/{sop}", {}),
        "filtered study": (f"/predictions/{FILTERED}/studies/{study.study_uid}", {"data-filters": filters}),
        "unknown study": (f"/predictions/{MODEL}/studies/1.2.999", {}),
        "unknown series": (f"{base}/series/1.2.999", {}),
        "unknown instance": (f"{base}/series/{small}/instances/1.2.999", {}),
    }


@pytest.mark.parametrize(
    "case", ["study", "series", "instance", "filtered study", "unknown study", "unknown series", "unknown instance"]
)
@pytest_twisted.ensureDeferred
async def test_folder_and_dicomweb_answer_alike(proxy, study, model_server, case):
    path, params = _cases(study)[case]
    seen = {}
    for server in (ORTHANC, FOLDER):
        before = model_server.last()
        response, body = await proxy.get_json(path, params={**params, "server": server})
        sent = model_server.last() if model_server.last() != before else None
        detail = body.get("detail", "").replace(server, "SERVER") if response.code != 200 else None
        seen[server] = (
            response.code,
            detail,
            sorted(sent["sops"]) if sent else None,
            json.dumps(sent["keys"], sort_keys=True) if sent and isinstance(sent["keys"], dict) else None,
        )

    assert seen[ORTHANC] == seen[FOLDER]
    code = seen[FOLDER][0]
    assert code == (404 if case.startswith("unknown") else 200)
